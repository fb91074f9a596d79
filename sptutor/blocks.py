"""The block math every sequence-parallel method is made of, written once in readable torch.

A method moves blocks of K and V (or states) between ranks; what each rank computes on them is one
of the functions here. The oracle's emulations and the real code's ``"torch"`` backend both call
them, so the two sides differ only in how blocks travel.

Softmax attention (see Design, *Conventions* and *Layering*):

- :func:`attention_block` — this rank's queries against one block of keys, masks from global
  positions, returning the block's output and log-sum-exp.
- :func:`merge` — the online-softmax merge of two partial results by their LSE.
- :func:`attention_block_backward` — the FlashAttention-2 backward of one block, given the *final*
  output and LSE of the rows (so block gradients simply add up).

Linear attention (see Design, *Linear attention*), in the section at the end:
:func:`linear_chunk_forward` and :func:`linear_chunk_backward` (one chunk, with its incoming and
outgoing state and a per-head decay) and the pieces they are made of, which LASP and LASP-2 schedule
differently. :func:`linear_chunk_intra_blocked` and :func:`linear_chunk_intra_backward_blocked`
compute the intra-chunk part in sub-chunks with the state carried between them (time and memory
linear in C); the ``"torch"`` backend runs those, the oracle the plain C×C form.

Blocks compute in float32 for 16-bit inputs and in float64 for float64 inputs (the accumulation
dtype); callers cast the final output back.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype of LSEs and accumulators."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which (query, key) pairs attend: (S_q, S_k) bool, from global positions only."""
    if causal:
        return q_pos[:, None] >= k_pos[None, :]
    return torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)


def any_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> bool:
    """Does any query see any key? (a fully masked block need not be computed)"""
    return not causal or bool(q_pos.max() >= k_pos.min())


def group_query_heads(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, S, Hq, D) -> (B, S, Hkv, G, D): the G = Hq/Hkv query heads that share a K/V head."""
    batch, seq, heads_q, head_dim = x.shape
    return x.reshape(batch, seq, heads_kv, heads_q // heads_kv, head_dim)


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Scaled scores of q: (B, S_q, Hq, D) against k: (B, S_k, Hkv, D), -inf where masked.

    Returns (B, Hkv, G, S_q, S_k) in the accumulation dtype, G = Hq/Hkv.
    """
    acc = accumulation_dtype(q.dtype)
    q_grouped = group_query_heads(q, k.shape[2]).to(acc)  # (B, S_q, Hkv, G, D)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_grouped, k.to(acc)) * scale
    return scores.masked_fill(~visible_pairs(q_pos, k_pos, causal), float("-inf"))


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(scores - lse)``: scores (B, Hkv, G, S_q, S_k), lse (B, Hq, S_q) -> probs like scores.

    Masked pairs get 0, and so do rows whose lse is -inf (they see no key).
    """
    batch, heads_kv, group, seq_q, _ = scores.shape
    lse = lse.reshape(batch, heads_kv, group, seq_q, 1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse)


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of some queries over one block of keys, in the accumulation dtype.

    q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D), Hq % Hkv == 0 (GQA without repeating K/V).
    q_pos: (S_q,), k_pos: (S_k,) global positions; causal masks pairs with q_pos < k_pos.
    Returns out: (B, S_q, Hq, D) and lse: (B, Hq, S_q); a row that sees no key of the block has
    out 0 and lse -inf, so :func:`merge` ignores it.
    """
    batch, seq_q, heads_q, head_dim = q.shape
    scores = _scores(q, k, q_pos, k_pos, causal, scale)  # (B, Hkv, G, S_q, S_k)
    lse = torch.logsumexp(scores, dim=-1).reshape(batch, heads_q, seq_q)  # (B, Hq, S_q)
    probs = _probabilities(scores, lse)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype))  # (B, S_q, Hkv, G, D)
    return out.reshape(batch, seq_q, heads_q, head_dim), lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets (online softmax).

    out, block_out: (B, S, Hq, D); lse, block_lse: (B, Hq, S). Each part is normalised over its own
    keys; the merged result is normalised over both:
    ``lse = log(e^lse + e^block_lse)`` and
    ``out = (e^lse·out + e^block_lse·block_out) / e^merged_lse``.
    Stable: everything is shifted by the larger LSE, and a part with lse -inf (no visible key)
    gets weight 0; if both are -inf the result is out 0, lse -inf.
    """
    larger = torch.maximum(lse, block_lse)
    shift = torch.where(torch.isinf(larger), torch.zeros_like(larger), larger)
    weight, block_weight = torch.exp(lse - shift), torch.exp(block_lse - shift)  # in [0, 1]
    total = weight + block_weight  # in [1, 2], or 0 when both parts are empty
    merged_lse = shift + torch.log(total)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))

    def per_token(x: torch.Tensor) -> torch.Tensor:  # (B, Hq, S) -> (B, S, Hq, 1)
        return (x / safe_total).transpose(1, 2)[..., None]

    merged_out = per_token(weight) * out + per_token(block_weight) * block_out
    return merged_out, merged_lse


def attention_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, FlashAttention-2 form, in the accumulation dtype.

    dout, out: (B, S_q, Hq, D) gradient of and *final* output of the rows (over all keys);
    lse: (B, Hq, S_q) their final LSE; q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D).
    With ``P = exp(S - lse)`` the block's share of the final softmax and
    ``delta = rowsum(dout * out)``: ``dV = P^T dout``, ``dS = P ⊙ (dout V^T - delta)``,
    ``dQ = scale·dS K``, ``dK = scale·dS^T Q``. Summing them over every block of keys gives the
    gradients of full attention. Returns dq: (B, S_q, Hq, D), dk, dv: (B, S_k, Hkv, D).
    """
    batch, seq_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    probs = _probabilities(_scores(q, k, q_pos, k_pos, causal, scale), lse)  # (B, Hkv, G, S_q, S_k)
    acc = probs.dtype
    dout_g = group_query_heads(dout, heads_kv).to(acc)  # (B, S_q, Hkv, G, D)
    delta = (dout_g * group_query_heads(out, heads_kv).to(acc)).sum(-1)  # (B, S_q, Hkv, G)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dout_g)  # (B, S_k, Hkv, D)
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dout_g, v.to(acc))
    dscores = probs * (dprobs - delta.permute(0, 2, 3, 1)[..., None])  # (B, Hkv, G, S_q, S_k)
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k.to(acc)) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, group_query_heads(q, heads_kv).to(acc)) * scale
    return dq.reshape(batch, seq_q, heads_q, head_dim), dk, dv


# ==================================================================================================
# Linear attention (Design, *Linear attention*): unnormalised, causal with a per-head decay, a
# state per query head.
#
# A chunk of C tokens starting after global position p0 splits into a part that needs no state
# (``linear_chunk_intra``) and parts that read or build the state ``KV_p0: (B, Hq, D, D)``
# (``linear_readout``, ``linear_local_state``, ``linear_carry``); ``linear_chunk_forward`` and
# ``linear_chunk_backward`` put them together. Non-causal attention is the same pieces with
# ``decay=None`` and no intra part: local state ``K^T V``, summed over ranks, read as ``q·KV``.
# Everything computes in the accumulation dtype; states are returned in it. The ``*_blocked``
# intra functions walk the chunk in sub-chunks with the state carried between them, so only the
# plain ``linear_chunk_intra`` and its backward ever build a C×C tensor.
# ==================================================================================================

# sub-chunk length T of the blocked intra functions: T² per sub-chunk stays small (O(C·T·D) work
# in all) while C/T Python steps stay few; T ~ D balances the T²·D and T·D² products
LINEAR_BLOCK = 128


def _to_query_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(B, C, Hkv, D) -> (B, C, Hq, D) in the accumulation dtype: K/V head h serves query heads
    h·G .. h·G+G-1 (GQA, as the ground truth broadcasts them)."""
    acc = x.to(accumulation_dtype(x.dtype))
    return acc.repeat_interleave(heads_q // x.shape[2], dim=2)


def _to_kv_heads(grad: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, C, Hq, D) -> (B, C, Hkv, D): a shared K/V head gets the sum of its query heads' grads."""
    return group_query_heads(grad, heads_kv).sum(3)


def _decay_rates(
    decay: torch.Tensor | None, heads_q: int, dtype: torch.dtype, device: torch.device | None
) -> torch.Tensor:
    """(Hq,) per-head decay in ``dtype`` (ones for None). Callers pass the accumulation dtype, so
    powers are taken in float32 or float64, never of a decay rounded to 16 bits."""
    if decay is None:
        return torch.ones(heads_q, dtype=dtype, device=device)
    return decay.to(device=device, dtype=dtype)


def linear_decay_mask(
    decay: torch.Tensor | None,
    heads_q: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The causal mask M of a chunk of ``length`` = C tokens: (Hq, C, C), ``decay^(i-j)`` for
    i >= j, else 0 (offsets i, j in 0..C-1). The only C×C decay tensor: plain intra form only."""
    rates = _decay_rates(decay, heads_q, dtype, device)
    offsets = torch.arange(length, device=rates.device)
    distance = offsets[:, None] - offsets[None, :]  # (C, C): i - j
    powers = rates[:, None, None] ** distance.clamp(min=0)  # (Hq, C, C)
    return torch.where(distance >= 0, powers, torch.zeros_like(powers))


def linear_query_decay(
    decay: torch.Tensor | None,
    heads_q: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(Hq, C): ``decay^(i+1)``, how much of the incoming state token i of the chunk sees."""
    rates = _decay_rates(decay, heads_q, dtype, device)
    return rates[:, None] ** torch.arange(1, length + 1, device=rates.device)


def linear_key_decay(
    decay: torch.Tensor | None,
    heads_q: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(Hq, C): ``decay^(C-1-i)``, how much of token i is left in the chunk's outgoing state."""
    rates = _decay_rates(decay, heads_q, dtype, device)
    return rates[:, None] ** torch.arange(length - 1, -1, -1, device=rates.device)


def linear_chunk_decay(
    decay: torch.Tensor | None,
    heads_q: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(Hq,): ``decay^C``, how much of the incoming state is left in the outgoing one."""
    return _decay_rates(decay, heads_q, dtype, device) ** length


def linear_chunk_intra(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """The part of a chunk's output that needs no state: ``[(Q K^T) ⊙ M] V``.

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None. Returns (B, C, Hq, D).
    """
    heads_q = q.shape[2]
    q, k, v = _to_query_heads(q, heads_q), _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)
    mask = linear_decay_mask(decay, heads_q, q.shape[1], q.dtype, q.device)  # (Hq, C, C)
    weights = torch.einsum("bihd,bjhd->bhij", q, k) * mask  # (B, Hq, C, C)
    return torch.einsum("bhij,bjhe->bihe", weights, v)


def linear_readout(
    q: torch.Tensor, state: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """What the chunk's queries read from an incoming state: ``o_i = decay^(i+1) q_i KV``.

    q: (B, C, Hq, D); state: (B, Hq, D, D). Returns (B, C, Hq, D). Non-causal (decay None) this
    is the whole output ``q·KV_total``.
    """
    q = _to_query_heads(q, q.shape[2])
    q_decay = linear_query_decay(decay, q.shape[2], q.shape[1], q.dtype, q.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bhde->bihe", q_decay, q, state.to(q.dtype))


def linear_local_state(
    k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None, *, heads_q: int
) -> torch.Tensor:
    """The chunk's own contribution to the outgoing state: ``sum_i decay^(C-1-i) k_i^T v_i``.

    k, v: (B, C, Hkv, D). Returns (B, Hq, D, D), one state per query head (see Design, *Linear
    attention*). It is ``KV_out`` for a zero incoming state; non-causal (decay None) it is
    ``K^T V``.
    """
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)
    k_decay = linear_key_decay(decay, heads_q, k.shape[1], k.dtype, k.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bihe->bhde", k_decay, k, v)


def linear_carry(
    state: torch.Tensor | None, local: torch.Tensor, decay: torch.Tensor | None, length: int
) -> torch.Tensor:
    """One step of the chain: ``decay^C · state + local`` (state None = 0), all (B, Hq, D, D).

    Forward it makes ``KV_out`` from ``KV_p0``; backward it makes ``dKV_p0`` from ``dKV_out``.
    """
    if state is None:
        return local
    acc = accumulation_dtype(local.dtype)
    chunk_decay = linear_chunk_decay(decay, local.shape[1], length, acc, local.device)  # (Hq,)
    return chunk_decay[:, None, None] * state.to(acc) + local.to(acc)  # (B, Hq, D, D)


def linear_chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention of one chunk given the state before it (Design, *Linear attention*).

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); state: KV_p0 (B, Hq, D, D), or None (= 0, the first
    chunk); decay: (Hq,) or None. Returns out (B, C, Hq, D) and KV_out (B, Hq, D, D).

    Derivation: the chunk holds positions p0+1 .. p0+C (offset i is position p0+1+i). Split
    ``o_i = sum_{j <= p0+1+i} decay^(p0+1+i-j) (q_i . k_j) v_j`` at the chunk's start:
    keys in the chunk (offsets j <= i) give ``decay^(i-j) (q_i . k_j) v_j = ([(Q K^T) ⊙ M] V)_i``;
    keys up to p0 give ``decay^(i+1) q_i sum_{j<=p0} decay^(p0-j) k_j^T v_j``, which is
    ``decay^(i+1) q_i KV_p0``.
    Likewise ``KV_out = KV_{p0+C} = decay^C KV_p0 + sum_i decay^(C-1-i) k_i^T v_i``.
    """
    out = linear_chunk_intra(q, k, v, decay)
    if state is not None:
        out = out + linear_readout(q, state, decay)
    local = linear_local_state(k, v, decay, heads_q=q.shape[2])
    return out, linear_carry(state, local, decay, q.shape[1])


def linear_chunk_intra_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``O = A V`` with ``A = (Q K^T) ⊙ M``: ``dV = A^T dO``,
    ``dA = (dO V^T) ⊙ M``, ``dQ = dA K``, ``dK = dA^T Q``.

    dout, q: (B, C, Hq, D); k, v: (B, C, Hkv, D). Returns dq (B, C, Hq, D), dk, dv (B, C, Hkv, D).
    """
    heads_q, heads_kv = q.shape[2], k.shape[2]
    q, dout = _to_query_heads(q, heads_q), _to_query_heads(dout, heads_q)
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)  # (B, C, Hq, D)
    mask = linear_decay_mask(decay, heads_q, q.shape[1], q.dtype, q.device)  # (Hq, C, C)
    weights = torch.einsum("bihd,bjhd->bhij", q, k) * mask  # (B, Hq, C, C)
    dweights = torch.einsum("bihe,bjhe->bhij", dout, v) * mask
    dq = torch.einsum("bhij,bjhd->bihd", dweights, k)
    dk = torch.einsum("bhij,bihd->bjhd", dweights, q)
    dv = torch.einsum("bhij,bihe->bjhe", weights, dout)
    return dq, _to_kv_heads(dk, heads_kv), _to_kv_heads(dv, heads_kv)


def linear_readout_backward(
    dout: torch.Tensor, state: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """dq of :func:`linear_readout`: ``dq_i = decay^(i+1) dO_i KV^T``. (B, C, Hq, D)."""
    dout = _to_query_heads(dout, dout.shape[2])
    q_decay = linear_query_decay(decay, dout.shape[2], dout.shape[1], dout.dtype, dout.device)
    return torch.einsum("hi,bihe,bhde->bihd", q_decay, dout, state.to(dout.dtype))


def linear_local_dstate(
    q: torch.Tensor, dout: torch.Tensor, decay: torch.Tensor | None
) -> torch.Tensor:
    """The chunk's own share of the gradient of the state it read: ``sum_i decay^(i+1) q_i^T dO_i``.

    q, dout: (B, C, Hq, D). Returns (B, Hq, D, D); non-causal (decay None) it is ``Q^T dO``.
    """
    q, dout = _to_query_heads(q, q.shape[2]), _to_query_heads(dout, q.shape[2])
    q_decay = linear_query_decay(decay, q.shape[2], q.shape[1], q.dtype, q.device)  # (Hq, C)
    return torch.einsum("hi,bihd,bihe->bhde", q_decay, q, dout)


def linear_local_state_backward(
    dstate: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv of :func:`linear_local_state` given dKV_out: (B, Hq, D, D).

    ``dk_i = decay^(C-1-i) v_i dKV^T``, ``dv_i = decay^(C-1-i) k_i dKV``; k, v: (B, C, Hkv, D).
    Returns dk, dv: (B, C, Hkv, D).
    """
    heads_q, heads_kv = dstate.shape[1], k.shape[2]
    k, v = _to_query_heads(k, heads_q), _to_query_heads(v, heads_q)  # (B, C, Hq, D)
    k_decay = linear_key_decay(decay, heads_q, k.shape[1], k.dtype, k.device)  # (Hq, C)
    dstate = dstate.to(k.dtype)
    dk = torch.einsum("hi,bihe,bhde->bihd", k_decay, v, dstate)
    dv = torch.einsum("hi,bihd,bhde->bihe", k_decay, k, dstate)
    return _to_kv_heads(dk, heads_kv), _to_kv_heads(dv, heads_kv)


def linear_chunk_backward(
    dout: torch.Tensor,
    dstate_out: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`linear_chunk_forward`, written out (no autograd).

    dout: (B, C, Hq, D); dstate_out: dKV_out (B, Hq, D, D), or None (= 0: no later chunk);
    q, k, v, state, decay as in the forward. Returns dq (B, C, Hq, D), dk, dv (B, C, Hkv, D) and
    dKV_p0 (B, Hq, D, D), the gradient to hand to the previous chunk.

    Derivation: with ``A = (Q K^T) ⊙ M``, ``a_i = decay^(i+1)``, ``b_i = decay^(C-1-i)``,
    ``g = decay^C``, the forward is ``O = A V + diag(a) Q KV_p0`` and
    ``KV_out = g KV_p0 + K^T diag(b) V``, so
    ``dQ = dA K + diag(a) dO KV_p0^T`` with ``dA = (dO V^T) ⊙ M``;
    ``dK = dA^T Q + diag(b) V dKV_out^T``; ``dV = A^T dO + diag(b) K dKV_out``;
    ``dKV_p0 = g dKV_out + Q^T diag(a) dO``.
    """
    dq, dk, dv = linear_chunk_intra_backward(dout, q, k, v, decay)
    if state is not None:
        dq = dq + linear_readout_backward(dout, state, decay)
    if dstate_out is not None:
        dk_state, dv_state = linear_local_state_backward(dstate_out, k, v, decay)
        dk, dv = dk + dk_state, dv + dv_state
    dstate_in = linear_carry(dstate_out, linear_local_dstate(q, dout, decay), decay, q.shape[1])
    return dq, dk, dv, dstate_in


def linear_chunk_intra_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
    block: int = LINEAR_BLOCK,
) -> torch.Tensor:
    """:func:`linear_chunk_intra` in sub-chunks of ``block`` = T tokens: no C×C tensor.

    q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None. Returns (B, C, Hq, D).
    Each sub-chunk is a chunk of its own (:func:`linear_chunk_forward`) that starts from the
    state of the sub-chunks before it — LASP's chain inside one rank — so time is O(C·T·D + C·D²)
    and memory beside inputs and output O(T² + D²) per (batch, head).
    """
    state, outs = None, []
    for start in range(0, q.shape[1], block):
        part = slice(start, start + block)
        out, state = linear_chunk_forward(q[:, part], k[:, part], v[:, part], state, decay)
        outs.append(out)  # (B, T, Hq, D)
    return torch.cat(outs, dim=1)


def linear_chunk_intra_backward_blocked(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
    block: int = LINEAR_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_chunk_intra_backward` in sub-chunks of ``block`` = T tokens: no C×C tensor.

    Shapes as there; time and memory as :func:`linear_chunk_intra_blocked`.
    ``dQ = [(dO V^T) ⊙ M] K`` is the intra forward of (dO, V, K), blocked. dK, dV walk the
    sub-chunks last to first, each a chunk with no incoming state (:func:`linear_chunk_backward`)
    handed the dKV of the sub-chunks after it; its dq (intra only) is not needed.
    """
    dq = linear_chunk_intra_blocked(dout, v, k, decay, block)
    dstate, dk, dv = None, [], []
    for start in reversed(range(0, q.shape[1], block)):
        part = slice(start, start + block)
        _, dk_part, dv_part, dstate = linear_chunk_backward(
            dout[:, part], dstate, q[:, part], k[:, part], v[:, part], None, decay
        )
        dk.insert(0, dk_part)  # (B, T, Hkv, D)
        dv.insert(0, dv_part)
    return dq, torch.cat(dk, dim=1), torch.cat(dv, dim=1)
