"""DeepSpeed-Ulysses on ``torch.distributed``: all-to-all from sequence to heads, local attention,
all-to-all back.

The Ulysses degree U is the number of ranks that split the heads: here all of the group (U = W).
Forward: this rank holds its S_r tokens of every head. One all-to-all per tensor (q, k, v)
scatters the heads and gathers the sequence, so group rank j holds all S tokens of head group j
(heads ``[j·H/U, (j+1)·H/U)``), in group-rank order: its positions are ``cat(positions[0..W-1])``,
its document ids ``cat(documents)``. It runs full-sequence attention on its heads (masks from those
global positions and documents, so every layout and packed documents work), and one more
all-to-all sends each rank's tokens of ``out`` back: heads -> sequence.

Uneven shards (W does not divide S): an all-to-all moves one chunk size, so every shard is padded
to the largest, ``L = max S_r = ceil(S/W)``, just before each all-to-all, and the padding is
dropped just after it (``sptutor.padding``): it travels, and is counted, but is never attended.

Backward mirrors it: an all-to-all of dout (sequence -> heads), the local FlashAttention-2 backward
with the final out and LSE this rank already holds in the heads layout, then all-to-alls of dq, dk,
dv back (heads -> sequence). Gradients go on the wire in the input dtype, like out: each is already
final when sent (the local backward summed over every key), so rounding before or after the
all-to-all is the same rounding, and the four backward all-to-alls cost what the four forward do.

GQA: K/V heads split over the ranks when ``Hkv % U == 0``. When ``U % Hkv == 0`` (fewer K/V heads
than ranks, e.g. MQA) each K/V head is first replicated U/Hkv times, so rank j gets replica j = K/V
head ``j // (U/Hkv)``: exactly the head its query heads need under GQA's ``h // (Hq/Hkv)``. The
replicas' dK, dV are summed after the backward all-to-all (``sptutor.heads``).

Mirrors ``oracle/ulysses.py`` step for step; here each process is one rank.
``sptutor/usp.py`` runs the all-to-all steps here inside its ulysses group of U ranks (there the
gathered sequence is the group's T_i tokens, not all S).
"""

from __future__ import annotations

import torch

from sptutor import backends, comm, heads, padding
from sptutor.checks import check_qkv, check_ulysses_heads


def _seq_to_heads(x, group, sizes, *, phase):
    """One all-to-all, sequence -> heads: x: (B, S_r, H, D) -> (B, S, H/U, D).

    sizes: the group's U shard lengths S_r. This rank pads its shard to L = max(sizes) (equal
    chunks), sends its head group j to group rank j, drops each received piece's padding and
    concatenates the U pieces in group-rank order.
    """
    # BEGIN SOLUTION ulysses sequence to heads: send head group j to rank j, gather the sequence
    _, degree = comm.rank_and_size(group)
    padded = padding.pad(x, max(sizes))  # (B, L, H, D)
    B, L, H, D = padded.shape
    # (B, L, H, D) -> (B, L, U, H/U, D) -> U x (B, L, H/U, D), piece j for rank j
    chunks = list(padded.reshape(B, L, degree, H // degree, D).unbind(2))
    received = comm.all_to_all(chunks, group, phase=phase)
    return padding.join(received, sizes)  # (B, S, H/U, D)
    # END SOLUTION


def _heads_to_seq(x, group, sizes, *, phase):
    """One all-to-all, heads -> sequence: x: (B, S, H/U, D) -> (B, S_r, H, D).

    This rank sends group rank i its tokens (the i-th of the ``sizes`` slices, padded to L) of
    our head group, stacks the head groups it receives and drops the padding.
    """
    # BEGIN SOLUTION ulysses heads to sequence: send rank i its tokens of our heads, stack the heads
    rank, _ = comm.rank_and_size(group)
    chunks = padding.split(x, sizes)  # U x (B, L, H/U, D)
    received = comm.all_to_all(chunks, group, phase=phase)
    stacked = torch.cat(received, dim=2)  # (B, L, H, D)
    return padding.unpad(stacked, sizes[rank])  # (B, S_r, H, D)
    # END SOLUTION


def _qkv_to_heads(q, k, v, group, sizes):
    """The forward all-to-alls of q, k, v (in that order), K/V heads replicated when Hkv < U.

    q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); sizes: the group's U shard lengths.
    Returns q: (B, S, Hq/U, D) and k, v: (B, S, max(Hkv/U, 1), D).
    """
    replicas = heads.replicas(k.shape[2], comm.rank_and_size(group)[1])
    # replica j goes to rank j and is K/V head j // rep, the one shared (h // (Hq/Hkv)) by rank j's
    # query heads j·Hq/U ... (j+1)·Hq/U - 1, since rep = U/Hkv query-head groups fill one K/V group
    k = k.repeat_interleave(replicas, dim=2)  # (B, S_r, Hkv·rep, D)
    v = v.repeat_interleave(replicas, dim=2)  # (B, S_r, Hkv·rep, D)
    q_heads = _seq_to_heads(q, group, sizes, phase="forward")
    k_heads = _seq_to_heads(k, group, sizes, phase="forward")
    v_heads = _seq_to_heads(v, group, sizes, phase="forward")
    return q_heads, k_heads, v_heads


def _grads_to_seq(dq, dk, dv, sizes, heads_kv, group):
    """The backward all-to-alls of dq, dk, dv (in that order), then the K/V replicas summed.

    dq: (B, S, Hq/U, D); dk, dv: (B, S, max(Hkv/U, 1), D); sizes: the group's U shard lengths;
    heads_kv: Hkv before replication. Returns dq: (B, S_r, Hq, D) and dk, dv: (B, S_r, Hkv, D).
    """
    replicas = heads.replicas(heads_kv, comm.rank_and_size(group)[1])
    dq = _heads_to_seq(dq, group, sizes, phase="backward")
    dk = _heads_to_seq(dk, group, sizes, phase="backward")
    dv = _heads_to_seq(dv, group, sizes, phase="backward")
    dk = heads.sum_replicas(dk, replicas)  # (B, S_r, Hkv, D)
    dv = heads.sum_replicas(dv, replicas)  # (B, S_r, Hkv, D)
    return dq, dk, dv


def _lse_to_seq(lse_heads, group, sizes):
    """This rank's LSE for its own tokens: one more all-to-all, heads -> sequence.

    lse_heads: (B, Hq/U, S), our head group over the gathered sequence; sizes: the group's U
    shard lengths. Returns (B, Hq, S_r). Sent only for ``return_lse=True`` (Ulysses itself never
    needs it; the oracle's ``_lse_for_checking`` reads the same numbers without a message).
    """
    # (B, Hq/U, S) -> (B, S, Hq/U, 1) -> (B, S_r, Hq, 1) -> (B, Hq, S_r)
    as_tokens = lse_heads.transpose(1, 2).unsqueeze(-1)
    lse = _heads_to_seq(as_tokens, group, sizes, phase="forward").squeeze(-1).transpose(1, 2)
    return lse.contiguous()


def _forward(q, k, v, positions, documents, causal, scale, group, backend):
    """q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); positions: W x (S_i,), every group rank's;
    documents: W x (S_i,) document ids, or W x None.

    Returns out: (B, S_r, Hq, D) in q's dtype, and what this rank keeps for backward, all in the
    heads layout: q: (B, S, Hq/U, D), k, v: (B, S, max(Hkv/U, 1), D), out like q, lse:
    (B, Hq/U, S).
    """
    sizes = [len(p) for p in positions]
    sequence = torch.cat(positions)  # (S,) the gathered tokens, in group-rank order
    (sequence_docs,) = heads.gathered_documents(documents, len(documents))  # (S,) or None
    q_heads, k_heads, v_heads = _qkv_to_heads(q, k, v, group, sizes)
    # full-sequence attention on this rank's heads
    out_heads, lse_heads = backends.attention_forward(
        backend, q_heads, k_heads, v_heads, sequence, sequence, causal, scale,
        sequence_docs, sequence_docs,
    )  # fmt: skip
    out_heads = out_heads.to(q.dtype)  # (B, S, Hq/U, D), sent in q's dtype
    out = _heads_to_seq(out_heads, group, sizes, phase="forward")
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)


def _backward(dout, saved, positions, documents, causal, scale, heads_kv, group, backend):
    """dout: (B, S_r, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs.

    Returns dq: (B, S_r, Hq, D) and dk, dv: (B, S_r, Hkv, D), in dout's dtype.
    """
    # BEGIN SOLUTION ulysses backward: dout to heads, the local backward, dq, dk, dv back
    sizes = [len(p) for p in positions]
    sequence = torch.cat(positions)  # (S,)
    (sequence_docs,) = heads.gathered_documents(documents, len(documents))  # (S,) or None
    q_heads, k_heads, v_heads, out_heads, lse_heads = saved
    dout_heads = _seq_to_heads(dout, group, sizes, phase="backward")  # (B, S, Hq/U, D)
    grads = backends.attention_backward(
        backend, dout_heads, q_heads, k_heads, v_heads, out_heads, lse_heads,
        sequence, sequence, causal, scale, sequence_docs, sequence_docs,
    )  # fmt: skip
    # final gradients, sent in the input dtype (see the module docstring)
    dq_heads, dk_heads, dv_heads = (g.to(dout.dtype) for g in grads)
    return _grads_to_seq(dq_heads, dk_heads, dv_heads, sizes, heads_kv, group)
    # END SOLUTION


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, causal, scale, group, backend):
        out, saved = _forward(q, k, v, positions, documents, causal, scale, group, backend)
        ctx.save_for_backward(*saved)
        ctx.options = (positions, documents, causal, scale, k.shape[2], group, backend)
        lse_heads = saved[-1]
        ctx.mark_non_differentiable(lse_heads)
        return out, lse_heads

    @staticmethod
    def backward(ctx, dout, _dlse_heads):
        dq, dk, dv = _backward(dout.contiguous(), ctx.saved_tensors, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


def _check_inputs(q, k, v, degree: int) -> None:
    """Checks this rank can make before Ulysses' first all-to-all over ``degree`` = U ranks.

    q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D): one sequence length, heads that split over U.
    """
    check_qkv(q, k, v)
    check_ulysses_heads(q.shape[2], k.shape[2], degree)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: str = "contiguous",
    group=None,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """DeepSpeed-Ulysses on (B, S_r, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards.

    q: (B, S_r, Hq, D) this rank's queries; k, v: (B, S_r, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them (S_r = S/W, or one
    token more or fewer when W does not divide S: then pass ``seq_len=S``). ``cu_seqlens``:
    (N+1,) offsets of packed documents over the global sequence (the same tensor on every
    rank): a query sees only keys of its own document. The heads split over all U = W ranks:
    needs ``Hq % U == 0`` and ``Hkv % U == 0`` or ``U % Hkv == 0`` (K/V heads replicated).
    Returns out: (B, S_r, Hq, D) this rank's output (differentiable), and with ``return_lse``
    also lse: (B, Hq, S_r) (detached, float32; float64 for float64 inputs), which costs one more
    all-to-all (heads -> sequence).
    """
    _, degree = comm.rank_and_size(group)
    _check_inputs(q, k, v, degree)
    positions, documents, _, backend, scale = backends.prepare(  # one block: nothing to skip
        "ulysses", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse, seq_len=seq_len, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    out, lse_heads = _UlyssesAttention.apply(
        q, k, v, positions, documents, causal, scale, group, backend
    )
    sizes = [len(p) for p in positions]
    return (out, _lse_to_seq(lse_heads, group, sizes)) if return_lse else out
