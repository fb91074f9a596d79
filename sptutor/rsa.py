"""Ring Self-Attention (RSA, Li et al. 2021) on ``torch.distributed``: full score rows, then rings
of K and V.

Mirrors ``oracle/rsa.py`` step for step (same step names, same order of messages); here each
process is one rank, and each ring hop is started before this block's compute so the two overlap.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): this rank fills its full score rows ``S^r: (B, Hq, S/W, S)`` block
   by block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions.
2. Softmax over the whole row, no online softmax: ``P = exp(S - lse)``.
3. Ring of values (W-1 hops): ``out = sum_src P[:, :, block(src)]·v_src`` (paper eq. 4).

Backward, the paper's code (``RingAV.backward`` then ``RingQK.backward``): all-reduce of
``P^T·dO`` (dV), ring of values (dP), softmax backward (dS), all-reduce of ``scale·dS^T·Q``
(dK), ring of keys (dQ). The choices the paper leaves open are listed in ``oracle/rsa.py``.

RSA always computes on torch, whatever ``backend`` says (see Design, *Public API*): its full score
rows, kept for backward, are the point of the method. Saved for backward: q, k, v and P
(B, Hq, S/W, S) in the inputs' dtype, O(S²/W).
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm, rows
from sptutor.checks import check_qkv


def _forward(q, k, v, positions, causal, scale, group):
    """q: (B, S/W, Hq, D); k, v: (B, S/W, Hkv, D); positions: W x (S/W,), every group rank's.

    Returns out: (B, S/W, Hq, D) in q's dtype, lse: (B, Hq, S/W) in the accumulation dtype, and
    probs: (B, Hq, S/W, S) in q's dtype (kept for backward).
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    batch, seq_local, heads_q, _ = q.shape
    rows_shape = (batch, heads_q, seq_local, W * seq_local)  # (B, Hq, S/W, S): full score rows
    # -inf until a block fills them (fully masked blocks are never computed)
    scores = torch.full(rows_shape, float("-inf"), dtype=acc, device=q.device)
    # BEGIN SOLUTION rsa ring of keys: fill the full score rows block by block as K travels
    k_from_prev_rank = [k]  # step 0: this rank's own
    for step in range(W):  # ring of keys (RingQK): S[:, :, block(src)] = scale·q·k_src^T
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = comm.ring_shift(k_from_prev_rank, group, phase="forward", step=step)
        src = (rank - step) % W  # whose block this rank holds now
        (k_block,) = k_from_prev_rank
        if blocks.any_visible(positions[rank], positions[src], causal):
            columns = rows.columns(src, seq_local)  # block(src): rank src's key columns
            scores[..., columns] = rows.scores_block(
                q, k_block, positions[rank], positions[src], causal, scale
            )
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    # softmax over the whole row (no online softmax); P is kept in the inputs' dtype
    lse, probs = rows.softmax(scores, q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    # BEGIN SOLUTION rsa ring of values: out += P[:, :, block(src)]·v_src as V travels
    v_from_prev_rank = [v]
    for step in range(W):  # ring of values (RingAV): out += P[:, :, block(src)]·v_src
        if step < W - 1:
            shift = comm.ring_shift(v_from_prev_rank, group, phase="forward", step=step)
        src = (rank - step) % W
        (v_block,) = v_from_prev_rank
        if blocks.any_visible(positions[rank], positions[src], causal):
            columns = rows.columns(src, seq_local)
            out += rows.weighted_block(probs[..., columns], v_block)
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    return out.to(q.dtype), lse, probs


def _backward(dout, q, k, v, probs, positions, causal, scale, group):
    """dout: (B, S/W, Hq, D); probs: (B, Hq, S/W, S) stored by the forward; q, k, v as in
    ``_forward``. Returns dq: (B, S/W, Hq, D) and dk, dv: (B, S/W, Hkv, D), in q's dtype.
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    batch, seq_local, heads_q, _ = q.shape
    rows_shape = (batch, heads_q, seq_local, W * seq_local)  # (B, Hq, S/W, S): full score rows
    # BEGIN SOLUTION rsa backward of values: dV = P^T·dO all-reduced, then dP as V travels again
    # RingAV.backward: dV = P^T·dO all-reduced, then dP as V travels the ring again
    dv = _all_reduced_key_gradient(probs, dout, k.shape[2], 1.0, group)
    dprobs = torch.zeros(rows_shape, dtype=acc, device=q.device)
    v_from_prev_rank = [v]
    for step in range(W):  # dP[:, :, block(src)] = dO·v_src^T; masked blocks stay 0 (P is 0)
        if step < W - 1:
            shift = comm.ring_shift(v_from_prev_rank, group, phase="backward", step=step)
        src = (rank - step) % W
        (v_block,) = v_from_prev_rank
        if blocks.any_visible(positions[rank], positions[src], causal):
            columns = rows.columns(src, seq_local)
            dprobs[..., columns] = rows.dprobs_block(dout, v_block)
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    dscores = rows.softmax_backward(probs, dprobs)
    # BEGIN SOLUTION rsa backward of keys: dK = scale·dS^T·Q all-reduced, then dQ as K travels again
    # RingQK.backward: dK = scale·dS^T·Q all-reduced, then dQ as K travels the ring again
    dk = _all_reduced_key_gradient(dscores, q, k.shape[2], scale, group)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    k_from_prev_rank = [k]
    for step in range(W):  # dQ += scale·dS[:, :, block(src)]·k_src
        if step < W - 1:
            shift = comm.ring_shift(k_from_prev_rank, group, phase="backward", step=step)
        src = (rank - step) % W
        (k_block,) = k_from_prev_rank
        if blocks.any_visible(positions[rank], positions[src], causal):
            columns = rows.columns(src, seq_local)
            dq += rows.weighted_block(dscores[..., columns], k_block) * scale
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    dtype = q.dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _all_reduced_key_gradient(weights, x, heads_kv, factor, group):
    """``factor·weights^T·x`` for every key, summed over ranks; this rank keeps its own rows.

    weights: (B, Hq, S/W, S) (P for dV, dS for dK); x: (B, S/W, Hq, D) (dout for dV, q for dK).
    Returns (B, S/W, Hkv, D) in the accumulation dtype.
    """
    rank, _ = comm.rank_and_size(group)
    seq_local = x.shape[1]
    # (B, S, Hkv, D): this rank's queries' share of every key's gradient
    share = factor * rows.key_gradient_share(weights, x, heads_kv)
    # all-reduce, then keep own rows, as the paper does (a reduce-scatter would send half)
    summed = comm.all_reduce(share, group, phase="backward")
    return summed[:, rows.columns(rank, seq_local)]


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, causal, scale, group):
        out, lse, probs = _forward(q, k, v, positions, causal, scale, group)
        ctx.save_for_backward(q, k, v, probs)
        ctx.options = (positions, causal, scale, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, probs = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, probs, *ctx.options)
        return dq, dk, dv, None, None, None, None


def rsa_attention(
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
):
    """Ring Self-Attention on (B, S/W, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards.

    q: (B, S/W, Hq, D) this rank's queries; k, v: (B, S/W, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them. ``backend`` is checked
    but RSA always computes on torch (see Design, *Public API*).
    Returns out: (B, S/W, Hq, D) this rank's output (differentiable), and with ``return_lse`` also
    lse: (B, Hq, S/W) (detached, float32; float64 for float64 inputs).
    """
    check_qkv(q, k, v)
    # a bad backend name is an error, but the full score rows stay in torch (Design, *Public API*)
    positions, _documents, _, scale = backends.prepare(
        "rsa", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse,
    )  # fmt: skip
    out, lse = _RingSelfAttention.apply(q, k, v, positions, causal, scale, group)
    return (out, lse) if return_lse else out
