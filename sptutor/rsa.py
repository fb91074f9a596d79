"""Ring Self-Attention (RSA, Li et al. 2021) on ``torch.distributed``: full score rows, then rings
of K and V.

Mirrors ``oracle/rsa.py`` step for step (same step names, same order of messages); here each
process is one rank, and each ring hop is started before this block's compute so the two overlap.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): this rank fills its full score rows ``S^r: (B, Hq, S_r, S)`` block
   by block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions (and
   document ids, with packed documents).
2. Softmax over the whole row, no online softmax: ``P = exp(S - lse)``.
3. Ring of values (W-1 hops): ``out = sum_src P[:, :, block(src)]·v_src`` (paper eq. 4).

Backward, the paper's code (``RingAV.backward`` then ``RingQK.backward``): all-reduce of
``P^T·dO`` (dV), ring of values (dP), softmax backward (dS), all-reduce of ``scale·dS^T·Q``
(dK), ring of keys (dQ). The choices the paper leaves open are listed in ``oracle/rsa.py``.

RSA always computes on torch, whatever ``backend`` says (see Design, *Public API*): its full score
rows, kept for backward, are the point of the method. Saved for backward: q, k, v and P
(B, Hq, S_r, S) in the inputs' dtype, O(S²/W). Uneven shards need no padding: each block travels
at its own size (``receive_tokens``), and the all-reduced gradients are full-length.
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm, padding, rows
from sptutor.checks import check_qkv


def _forward(q, k, v, positions, documents, visible, causal, scale, group):
    """q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); positions: W x (S_i,), every group rank's;
    documents: W x (S_i,) document ids, or W x None; visible: W bools, whether this rank's
    queries see any key of rank i's block (decided on the host).

    Returns out: (B, S_r, Hq, D) in q's dtype, lse: (B, Hq, S_r) in the accumulation dtype, and
    probs: (B, Hq, S_r, S) in q's dtype (kept for backward).
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    spans = padding.spans([len(p) for p in positions])  # block(src): rank src's key columns
    seq_len = spans[-1].stop
    # (B, Hq, S_r, S): full score rows, -inf until a block fills them (masked blocks never are)
    scores = torch.full((q.shape[0], q.shape[2], q.shape[1], seq_len), float("-inf"),
                        dtype=acc, device=q.device)  # fmt: skip
    # BEGIN SOLUTION rsa ring of keys: fill the full score rows block by block as K travels
    k_from_prev_rank = [k]  # step 0: this rank's own
    for step in range(W):  # ring of keys (RingQK): S[:, :, block(src)] = scale·q·k_src^T
        src = (rank - step) % W  # whose block this rank holds now
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = comm.ring_shift(k_from_prev_rank, group, phase="forward", step=step,
                                    receive_tokens=len(positions[(src - 1) % W]))  # fmt: skip
        (k_block,) = k_from_prev_rank
        mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
        if visible[src]:  # decided on the host: a hidden block is skipped
            scores[..., spans[src]] = rows.scores_block(
                q, k_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
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
        src = (rank - step) % W
        if step < W - 1:
            shift = comm.ring_shift(v_from_prev_rank, group, phase="forward", step=step,
                                    receive_tokens=len(positions[(src - 1) % W]))  # fmt: skip
        (v_block,) = v_from_prev_rank
        if visible[src]:
            out += rows.weighted_block(probs[..., spans[src]], v_block)
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    return out.to(q.dtype), lse, probs


def _backward(dout, q, k, v, probs, positions, documents, visible, causal, scale, group):
    """dout: (B, S_r, Hq, D); probs: (B, Hq, S_r, S) stored by the forward; q, k, v, positions,
    documents, visible as in ``_forward``. Returns dq: (B, S_r, Hq, D) and dk, dv:
    (B, S_r, Hkv, D), in q's dtype.
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    spans = padding.spans([len(p) for p in positions])
    # BEGIN SOLUTION rsa backward of values: dV = P^T·dO all-reduced, then dP as V travels again
    # RingAV.backward: dV = P^T·dO all-reduced, then dP as V travels the ring again
    dv = _all_reduced_key_gradient(probs, dout, k.shape[2], 1.0, spans, group)
    dprobs = torch.zeros(probs.shape, dtype=acc, device=q.device)  # (B, Hq, S_r, S): full rows
    v_from_prev_rank = [v]
    for step in range(W):  # dP[:, :, block(src)] = dO·v_src^T; masked blocks stay 0 (P is 0)
        src = (rank - step) % W
        if step < W - 1:
            shift = comm.ring_shift(v_from_prev_rank, group, phase="backward", step=step,
                                    receive_tokens=len(positions[(src - 1) % W]))  # fmt: skip
        (v_block,) = v_from_prev_rank
        if visible[src]:
            dprobs[..., spans[src]] = rows.dprobs_block(dout, v_block)
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    dscores = rows.softmax_backward(probs, dprobs)
    # BEGIN SOLUTION rsa backward of keys: dK = scale·dS^T·Q all-reduced, then dQ as K travels again
    # RingQK.backward: dK = scale·dS^T·Q all-reduced, then dQ as K travels the ring again
    dk = _all_reduced_key_gradient(dscores, q, k.shape[2], scale, spans, group)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    k_from_prev_rank = [k]
    for step in range(W):  # dQ += scale·dS[:, :, block(src)]·k_src
        src = (rank - step) % W
        if step < W - 1:
            shift = comm.ring_shift(k_from_prev_rank, group, phase="backward", step=step,
                                    receive_tokens=len(positions[(src - 1) % W]))  # fmt: skip
        (k_block,) = k_from_prev_rank
        if visible[src]:
            dq += rows.weighted_block(dscores[..., spans[src]], k_block) * scale
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    dtype = q.dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _all_reduced_key_gradient(weights, x, heads_kv, factor, spans, group):
    """``factor·weights^T·x`` for every key, summed over ranks; this rank keeps its own rows.

    weights: (B, Hq, S_r, S) (P for dV, dS for dK); x: (B, S_r, Hq, D) (dout for dV, q for dK);
    spans: every rank's rows of the full length. Returns (B, S_r, Hkv, D) in the accumulation
    dtype.
    """
    rank, _ = comm.rank_and_size(group)
    # (B, S, Hkv, D): this rank's queries' share of every key's gradient, the same size on every
    # rank whatever its S_r, as an all-reduce needs
    share = factor * rows.key_gradient_share(weights, x, heads_kv)
    # all-reduce, then keep own rows, as the paper does (a reduce-scatter would send half)
    summed = comm.all_reduce(share, group, phase="backward")
    return summed[:, spans[rank]]


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, visible, causal, scale, group):
        out, lse, probs = _forward(q, k, v, positions, documents, visible, causal, scale, group)
        ctx.save_for_backward(q, k, v, probs)
        ctx.options = (positions, documents, visible, causal, scale, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, probs = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, probs, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


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
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """Ring Self-Attention on (B, S_r, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards.

    q: (B, S_r, Hq, D) this rank's queries; k, v: (B, S_r, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them (S_r = S/W, or one
    token more or fewer when W does not divide S: then pass ``seq_len=S``). ``cu_seqlens``:
    (N+1,) offsets of packed documents over the global sequence (the same tensor on every
    rank): a query sees only keys of its own document. ``backend`` is checked but RSA always
    computes on torch (see Design, *Public API*).
    Returns out: (B, S_r, Hq, D) this rank's output (differentiable), and with ``return_lse``
    also lse: (B, Hq, S_r) (detached, float32; float64 for float64 inputs).
    """
    check_qkv(q, k, v)
    # a bad backend name is an error, but the full score rows stay in torch (Design, *Public API*)
    positions, documents, visible, _, scale = backends.prepare(
        "rsa", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse, seq_len=seq_len, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    rank = comm.rank_and_size(group)[0]
    out, lse = _RingSelfAttention.apply(
        q, k, v, positions, documents, visible[rank], causal, scale, group
    )
    return (out, lse) if return_lse else out
