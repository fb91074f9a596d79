"""The chunk math of linear attention, written once in readable torch: what LASP and LASP-2 compute.

Unnormalised, causal with a per-head decay, one state per query head (see Design, *Linear
attention*). A chunk of C tokens starting after global position p0 splits into a part that needs no
state, :func:`intra` ``[(Q K^T) ⊙ M] V``, and parts that read or build the state
``KV_p0: (B, Hq, D, D)``: :func:`readout` ``decay^(i+1) q_i KV_p0``, :func:`local_state`
``sum_i decay^(C-1-i) k_i^T v_i`` and :func:`carry` ``decay^C KV_p0 + local`` (one step of the
chain). :func:`forward` and :func:`backward` put them together; LASP and LASP-2 schedule them
differently. Non-causal attention is the same pieces with ``decay=None`` and no intra part: local
state ``K^T V``, summed over ranks, read as ``q·KV``.

:func:`intra_blocked` and :func:`intra_backward_blocked` walk the chunk in sub-chunks with the state
carried between them (time and memory linear in C); the ``"torch"`` backend runs those, the oracle
the plain C×C form. Everything computes in the accumulation dtype; states are returned in it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sptutor.blocks import accumulation_dtype, group_query_heads

# sub-chunk length T of the blocked intra functions: T² per sub-chunk stays small (O(C·T·D) work
# in all) while C/T Python steps stay few; T ~ D balances the T²·D and T·D² products
SUB_CHUNK = 128

# decay: (Hq,) per-head rate in (0, 1] (float, not differentiable), or None (= 1, no decay)
Decay = torch.Tensor | None


def _to_query_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(B, C, Hkv, D) -> (B, C, Hq, D) in the accumulation dtype: K/V head h serves query heads
    h·G .. h·G+G-1 (GQA, as the ground truth broadcasts them)."""
    acc = x.to(accumulation_dtype(x.dtype))
    return acc.repeat_interleave(heads_q // x.shape[2], dim=2)


def _to_kv_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, C, Hq, D) -> (B, C, Hkv, D): a shared K/V head gets the sum of its query heads' grads."""
    return group_query_heads(grad, heads_kv).sum(3)


def _rates(
    decay: Decay, heads_q: int, dtype: torch.dtype, device: torch.device | None
) -> torch.Tensor:
    """(Hq,) per-head decay in ``dtype`` (ones for None). Callers pass the accumulation dtype, so
    powers are taken in float32 or float64, never of a decay rounded to 16 bits."""
    if decay is None:
        return torch.ones(heads_q, dtype=dtype, device=device)
    return decay.to(device=device, dtype=dtype)


def decay_mask(
    decay: Decay, heads_q: int, length: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """The causal mask M of a chunk of ``length`` = C tokens: (Hq, C, C), ``decay^(i-j)`` for
    i >= j, else 0. The only C×C decay tensor: plain intra form only."""
    rates = _rates(decay, heads_q, dtype, device)
    offsets = torch.arange(length, device=rates.device)
    distance = offsets[:, None] - offsets[None, :]  # (C, C): i - j
    powers = rates[:, None, None] ** distance.clamp(min=0)  # (Hq, C, C)
    return torch.where(distance >= 0, powers, torch.zeros_like(powers))


def query_decay(
    decay: Decay, heads_q: int, length: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """(Hq, C): ``decay^(i+1)``, how much of the incoming state token i of the chunk sees."""
    rates = _rates(decay, heads_q, dtype, device)
    return rates[:, None] ** torch.arange(1, length + 1, device=rates.device)


def key_decay(
    decay: Decay, heads_q: int, length: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """(Hq, C): ``decay^(C-1-i)``, how much of token i is left in the chunk's outgoing state."""
    rates = _rates(decay, heads_q, dtype, device)
    return rates[:, None] ** torch.arange(length - 1, -1, -1, device=rates.device)


def chunk_decay(
    decay: Decay, heads_q: int, length: int, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """(Hq,): ``decay^C``, how much of the incoming state is left in the outgoing one."""
    return _rates(decay, heads_q, dtype, device) ** length


def intra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Decay) -> torch.Tensor:
    """The part of a chunk's output that needs no state: ``[(Q K^T) ⊙ M] V``.

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None. Returns (B, C, Hq, D).
    """
    heads_q = q.shape[2]
    q, k, v = _to_query_heads(q, heads_q), _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)
    mask = decay_mask(decay, heads_q, q.shape[1], q.dtype, q.device)  # (Hq, C, C)
    weights = torch.einsum("bihd,bjhd->bhij", q, k) * mask  # (B, Hq, C, C)
    return torch.einsum("bhij,bjhe->bihe", weights, v)


def readout(q: torch.Tensor, state: torch.Tensor, decay: Decay) -> torch.Tensor:
    """What the chunk's queries read from an incoming state: ``o_i = decay^(i+1) q_i KV``.

    q: (B, C, Hq, D); state: (B, Hq, D, D). Returns (B, C, Hq, D); non-causal (decay None) this
    is the whole output ``q·KV_total``.
    """
    q = _to_query_heads(q, q.shape[2])
    q_decay = query_decay(decay, q.shape[2], q.shape[1], q.dtype, q.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bhde->bihe", q_decay, q, state.to(q.dtype))


def local_state(k: torch.Tensor, v: torch.Tensor, decay: Decay, *, heads_q: int) -> torch.Tensor:
    """The chunk's own contribution to the outgoing state: ``sum_i decay^(C-1-i) k_i^T v_i``.

    k, v: (B, C, Hkv, D). Returns (B, Hq, D, D), one state per query head: ``KV_out`` for a zero
    incoming state; non-causal (decay None) it is ``K^T V``.
    """
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)
    k_decay = key_decay(decay, heads_q, k.shape[1], k.dtype, k.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bihe->bhde", k_decay, k, v)


def carry(
    state: torch.Tensor | None, local: torch.Tensor, decay: Decay, length: int
) -> torch.Tensor:
    """One step of the chain: ``decay^C · state + local`` (state None = 0), all (B, Hq, D, D).

    Forward it makes ``KV_out`` from ``KV_p0``; backward it makes ``dKV_p0`` from ``dKV_out``.
    """
    if state is None:
        return local
    acc = accumulation_dtype(local.dtype)
    decay_c = chunk_decay(decay, local.shape[1], length, acc, local.device)  # (Hq,)
    return decay_c[:, None, None] * state.to(acc) + local.to(acc)  # (B, Hq, D, D)


def decayed_sum(
    states: Iterable[torch.Tensor], decay: Decay, lengths: Iterable[int]
) -> torch.Tensor | None:
    """``sum_n decay^(C_{n+1} + ... + C_{N-1}) states[n]`` (None if there are none) by Horner:
    the chain of :func:`carry` steps over N chunks of ``lengths`` C_n tokens, run on one rank
    (LASP-2). Each state is decayed by the lengths of the chunks after it (C_0 is not used)."""
    total = None
    for state, length in zip(states, lengths, strict=True):
        total = carry(total, state, decay, length)
    return total


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None, decay: Decay
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention of one chunk given the state before it (Design, *Linear attention*).

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); state: KV_p0 (B, Hq, D, D), or None (= 0, the first
    chunk); decay: (Hq,) or None. Returns out (B, C, Hq, D) and KV_out (B, Hq, D, D).

    Derivation: offset i is position p0+1+i. Keys in the chunk (j <= i) give
    ``decay^(i-j) (q_i . k_j) v_j = ([(Q K^T) ⊙ M] V)_i``; keys up to p0 give
    ``decay^(i+1) q_i sum_{j<=p0} decay^(p0-j) k_j^T v_j = decay^(i+1) q_i KV_p0``.
    Likewise ``KV_out = KV_{p0+C} = decay^C KV_p0 + sum_i decay^(C-1-i) k_i^T v_i``.
    """
    out = intra(q, k, v, decay)
    if state is not None:
        out = out + readout(q, state, decay)
    local = local_state(k, v, decay, heads_q=q.shape[2])
    return out, carry(state, local, decay, q.shape[1])


def intra_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Decay
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``O = A V`` with ``A = (Q K^T) ⊙ M``: ``dV = A^T dO``,
    ``dA = (dO V^T) ⊙ M``, ``dQ = dA K``, ``dK = dA^T Q``.

    dout, q: (B, C, Hq, D); k, v: (B, C, Hkv, D). Returns dq (B, C, Hq, D), dk, dv (B, C, Hkv, D).
    """
    heads_q, heads_kv = q.shape[2], k.shape[2]
    q, dout = _to_query_heads(q, heads_q), _to_query_heads(dout, heads_q)
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)  # (B, C, Hq, D)
    mask = decay_mask(decay, heads_q, q.shape[1], q.dtype, q.device)  # (Hq, C, C)
    weights = torch.einsum("bihd,bjhd->bhij", q, k) * mask  # (B, Hq, C, C)
    dweights = torch.einsum("bihe,bjhe->bhij", dout, v) * mask
    dq = torch.einsum("bhij,bjhd->bihd", dweights, k)
    dk = torch.einsum("bhij,bihd->bjhd", dweights, q)
    dv = torch.einsum("bhij,bihe->bjhe", weights, dout)
    return dq, _to_kv_heads(dk, heads_kv), _to_kv_heads(dv, heads_kv)


def readout_backward(dout: torch.Tensor, state: torch.Tensor, decay: Decay) -> torch.Tensor:
    """dq of :func:`readout`: ``dq_i = decay^(i+1) dO_i KV^T``. (B, C, Hq, D)."""
    dout = _to_query_heads(dout, dout.shape[2])
    q_decay = query_decay(decay, dout.shape[2], dout.shape[1], dout.dtype, dout.device)
    return torch.einsum("hi,bihe,bhde->bihd", q_decay, dout, state.to(dout.dtype))


def local_dstate(q: torch.Tensor, dout: torch.Tensor, decay: Decay) -> torch.Tensor:
    """The chunk's own share of the gradient of the state it read: ``sum_i decay^(i+1) q_i^T dO_i``.

    q, dout: (B, C, Hq, D). Returns (B, Hq, D, D); non-causal (decay None) it is ``Q^T dO``.
    """
    q, dout = _to_query_heads(q, q.shape[2]), _to_query_heads(dout, q.shape[2])
    q_decay = query_decay(decay, q.shape[2], q.shape[1], q.dtype, q.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bihe->bhde", q_decay, q, dout)


def local_state_backward(
    dstate: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Decay
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv of :func:`local_state` given dKV_out: (B, Hq, D, D).

    ``dk_i = decay^(C-1-i) v_i dKV^T``, ``dv_i = decay^(C-1-i) k_i dKV``; k, v: (B, C, Hkv, D).
    Returns dk, dv: (B, C, Hkv, D).
    """
    heads_q, heads_kv = dstate.shape[1], k.shape[2]
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)  # (B, C, Hq, D)
    k_decay = key_decay(decay, heads_q, k.shape[1], k.dtype, k.device)  # (Hq, C)
    dstate = dstate.to(k.dtype)
    dk = torch.einsum("hi,bihe,bhde->bihd", k_decay, v, dstate)
    dv = torch.einsum("hi,bihd,bhde->bihe", k_decay, k, dstate)
    return _to_kv_heads(dk, heads_kv), _to_kv_heads(dv, heads_kv)


def backward(
    dout: torch.Tensor,
    dstate_out: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    decay: Decay,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward`, written out (no autograd).

    dout: (B, C, Hq, D); dstate_out: dKV_out (B, Hq, D, D), or None (= 0: no later chunk);
    q, k, v, state, decay as in the forward. Returns dq (B, C, Hq, D), dk, dv (B, C, Hkv, D) and
    dKV_p0 (B, Hq, D, D), the gradient to hand to the previous chunk.

    Derivation: with ``A = (Q K^T) ⊙ M``, ``a_i = decay^(i+1)``, ``b_i = decay^(C-1-i)``,
    ``g = decay^C``, the forward is ``O = A V + diag(a) Q KV_p0`` and
    ``KV_out = g KV_p0 + K^T diag(b) V``, so ``dQ = dA K + diag(a) dO KV_p0^T`` with
    ``dA = (dO V^T) ⊙ M``; ``dK = dA^T Q + diag(b) V dKV_out^T``;
    ``dV = A^T dO + diag(b) K dKV_out``; ``dKV_p0 = g dKV_out + Q^T diag(a) dO``.
    """
    dq, dk, dv = intra_backward(dout, q, k, v, decay)
    if state is not None:
        dq = dq + readout_backward(dout, state, decay)
    if dstate_out is not None:
        dk_state, dv_state = local_state_backward(dstate_out, k, v, decay)
        dk, dv = dk + dk_state, dv + dv_state
    dstate_in = carry(dstate_out, local_dstate(q, dout, decay), decay, q.shape[1])
    return dq, dk, dv, dstate_in


def intra_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Decay, sub_chunk: int = SUB_CHUNK
) -> torch.Tensor:
    """:func:`intra` in sub-chunks of ``sub_chunk`` = T tokens: no C×C tensor.

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None. Returns (B, C, Hq, D).
    Each sub-chunk is a chunk of its own (:func:`forward`) that starts from the state of the
    sub-chunks before it — LASP's chain inside one rank — so time is O(C·T·D + C·D²) and memory
    beside inputs and output O(T² + D²) per (batch, head).
    """
    state, outs = None, []
    for start in range(0, q.shape[1], sub_chunk):
        part = slice(start, start + sub_chunk)
        out, state = forward(q[:, part], k[:, part], v[:, part], state, decay)
        outs.append(out)  # (B, T, Hq, D)
    return torch.cat(outs, dim=1)


def intra_backward_blocked(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Decay,
    sub_chunk: int = SUB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`intra_backward` in sub-chunks of ``sub_chunk`` = T tokens: no C×C tensor.

    Shapes as there; time and memory as :func:`intra_blocked`. ``dQ = [(dO V^T) ⊙ M] K`` is the
    intra forward of (dO, V, K), blocked. dK, dV walk the sub-chunks last to first, each a chunk
    with no incoming state (:func:`backward`) handed the dKV of the sub-chunks after it; its dq
    (intra only) is not needed.
    """
    dq = intra_blocked(dout, v, k, decay, sub_chunk)
    dstate, dk, dv = None, [], []
    for start in reversed(range(0, q.shape[1], sub_chunk)):
        part = slice(start, start + sub_chunk)
        _, dk_part, dv_part, dstate = backward(
            dout[:, part], dstate, q[:, part], k[:, part], v[:, part], None, decay
        )
        dk.insert(0, dk_part)  # (B, T, Hkv, D)
        dv.insert(0, dv_part)
    return dq, torch.cat(dk, dim=1), torch.cat(dv, dim=1)
