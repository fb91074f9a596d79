"""Ring Self-Attention (RSA, Li et al. 2021), emulated: full score rows, then rings of K and V.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): rank r fills its full score rows ``S^r: (B, Hq, S/W, S)`` block by
   block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions.
2. Softmax over the whole row, no online softmax: ``P = exp(S - lse)``.
3. Ring of values (W-1 hops): ``out = sum_src P[:, :, block(src)]·v_src`` (paper eq. 4).

Backward, the paper's code (``RingAV.backward`` then ``RingQK.backward``; the paper itself only
summarises it):

1. ``P^T·dO``: the local queries' share of the gradient of *every* key's value, (B, S, Hkv, D);
   all-reduce, each rank keeps its own rows.
2. Ring of values again (W-1 hops): ``dP[:, :, block(src)] = dO·v_src^T``.
3. Softmax backward: ``dS = P ⊙ (dP - rowsum(P ⊙ dP))``.
4. ``scale·dS^T·Q`` for every key, all-reduce, keep own rows.
5. Ring of keys again (W-1 hops): ``dQ += scale·dS[:, :, block(src)]·k_src``.

Messages of every rank, in order. Forward: K sends (steps 0..W-2), then V sends (steps 0..W-2).
Backward: all_reduce of dV, V sends (steps 0..W-2), all_reduce of dK, K sends (steps 0..W-2) —
the order in which autograd runs the paper's two functions, each all-reducing before its ring.

Choices, where the paper leaves room:

- ``block(src)`` are the columns (or full-length gradient rows) ``[src·S/W, (src+1)·S/W)``: keys
  in source-rank order, whatever the layout; masks always come from ``positions[src]``.
- P is stored in the inputs' dtype, as the paper's code stores its softmax output, so the
  O(S²/W) memory is the paper's; it is computed in the accumulation dtype and rounded once, and
  the forward uses the stored P so that forward and backward agree.
- All-reduce, then keep own rows, as the paper does (so its byte count holds); a reduce-scatter
  would send half as much.
- A row that sees no key (possible only with custom positions) gets P 0 and lse -inf.
- No division by W: Colossal-AI divides dQ, dK, dV by N, a scaling tied to its own gradient
  averaging; we return the true gradients.
- Causal masks and GQA are ours (the paper treats bidirectional multi-head attention only).
- Compute events count D multiply-adds per visible (query, key) pair and query head for each
  product: QK^T and PV forward; dV, dP, dK and dQ backward (no recomputation: P is stored).

Saved for backward per rank: its q, k, v shards and P (B, Hq, S/W, S).
Mirrors ``sptutor/rsa.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, rows, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _forward(world, q, k, v, positions, causal, scale):
    """q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); positions: W x (S/W,).

    Returns out: W x (B, S/W, Hq, D) in q's dtype, lse: W x (B, Hq, S/W) in the accumulation
    dtype, and probs: W x (B, Hq, S/W, S) in q's dtype (kept for backward).
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    batch, seq_local, heads_q, _ = q[0].shape
    rows_shape = (batch, heads_q, seq_local, W * seq_local)  # (B, Hq, S/W, S): full score rows
    # -inf until a block fills them (fully masked blocks are never computed)
    scores = [torch.full(rows_shape, float("-inf"), dtype=acc) for _ in q]
    # BEGIN SOLUTION rsa ring of keys: fill the full score rows block by block as K travels
    k_from_prev_rank = [[k[rank]] for rank in range(W)]  # step 0: each rank's own
    for step in range(W):  # ring of keys (RingQK): S[:, :, block(src)] = scale·q·k_src^T
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = world.ring_shift(k_from_prev_rank, phase="forward", step=step)
        for rank in range(W):
            src = (rank - step) % W  # whose block this rank holds now
            (k_block,) = k_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                columns = rows.columns(src, seq_local)  # block(src): rank src's key columns
                scores[rank][..., columns] = rows.scores_block(
                    q[rank], k_block, positions[rank], positions[src], causal, scale
                )
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal),
                              "forward", step, block=src)  # fmt: skip
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    # softmax over the whole row (no online softmax); P is kept in the inputs' dtype
    lse, probs = zip(*(rows.softmax(scores[rank], q[0].dtype) for rank in range(W)))
    out = [torch.zeros(x.shape, dtype=acc) for x in q]
    # BEGIN SOLUTION rsa ring of values: out += P[:, :, block(src)]·v_src as V travels
    v_from_prev_rank = [[v[rank]] for rank in range(W)]
    for step in range(W):  # ring of values (RingAV): out += P[:, :, block(src)]·v_src
        if step < W - 1:
            shift = world.ring_shift(v_from_prev_rank, phase="forward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            (v_block,) = v_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                columns = rows.columns(src, seq_local)
                out[rank] += rows.weighted_block(probs[rank][..., columns], v_block)
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal),
                              "forward", step, block=src)  # fmt: skip
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    return [o.to(q[0].dtype) for o in out], list(lse), list(probs)


def _backward(world, dout, q, k, v, probs, positions, causal, scale):
    """dout: W x (B, S/W, Hq, D); probs: W x (B, Hq, S/W, S) stored by the forward; q, k, v as in
    ``_forward``. Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D), in q's dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    batch, seq_local, heads_q, _ = q[0].shape
    rows_shape = (batch, heads_q, seq_local, W * seq_local)  # (B, Hq, S/W, S): full score rows
    # BEGIN SOLUTION rsa backward of values: dV = P^T·dO all-reduced, then dP as V travels again
    # RingAV.backward: dV = P^T·dO all-reduced, then dP as V travels the ring again
    dv = _all_reduced_key_gradient(world, probs, dout, k[0].shape[2], 1.0, positions, causal)
    dprobs = [torch.zeros(rows_shape, dtype=acc) for _ in q]
    v_from_prev_rank = [[v[rank]] for rank in range(W)]
    for step in range(W):  # dP[:, :, block(src)] = dO·v_src^T; masked blocks stay 0 (P is 0)
        if step < W - 1:
            shift = world.ring_shift(v_from_prev_rank, phase="backward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            (v_block,) = v_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                columns = rows.columns(src, seq_local)
                dprobs[rank][..., columns] = rows.dprobs_block(dout[rank], v_block)
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal),
                              "backward", step, block=src)  # fmt: skip
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    dscores = [rows.softmax_backward(probs[rank], dprobs[rank]) for rank in range(W)]
    # BEGIN SOLUTION rsa backward of keys: dK = scale·dS^T·Q all-reduced, then dQ as K travels again
    # RingQK.backward: dK = scale·dS^T·Q all-reduced, then dQ as K travels the ring again
    dk = _all_reduced_key_gradient(world, dscores, q, k[0].shape[2], scale, positions, causal)
    dq = [torch.zeros(x.shape, dtype=acc) for x in q]
    k_from_prev_rank = [[k[rank]] for rank in range(W)]
    for step in range(W):  # dQ += scale·dS[:, :, block(src)]·k_src
        if step < W - 1:
            shift = world.ring_shift(k_from_prev_rank, phase="backward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            (k_block,) = k_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                columns = rows.columns(src, seq_local)
                dq[rank] += rows.weighted_block(dscores[rank][..., columns], k_block) * scale
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal),
                              "backward", step, block=src)  # fmt: skip
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    dtype = q[0].dtype
    return [x.to(dtype) for x in dq], [x.to(dtype) for x in dk], [x.to(dtype) for x in dv]


def _all_reduced_key_gradient(world, weights, x, heads_kv, factor, positions, causal):
    """``factor·weights^T·x`` for every key, summed over ranks; each rank keeps its own rows.

    weights: W x (B, Hq, S/W, S) (P for dV, dS for dK); x: W x (B, S/W, Hq, D) (dout for dV, q
    for dK). Returns W x (B, S/W, Hkv, D) in the accumulation dtype.
    """
    seq_local = x[0].shape[1]
    column_positions = torch.cat(positions)  # (S,) global position of each score column
    shares = []  # W x (B, S, Hkv, D): each rank's queries' share of every key's gradient
    for rank in range(world.size):
        shares.append(factor * rows.key_gradient_share(weights[rank], x[rank], heads_kv))
        world.compute(rank, _macs(x[rank], positions[rank], column_positions, causal), "backward")
    # all-reduce, then keep own rows, as the paper does (a reduce-scatter would send half)
    summed = world.all_reduce(shares, phase="backward")
    return [full[:, rows.columns(rank, seq_local)] for rank, full in enumerate(summed)]


def _macs(x, q_pos, k_pos, causal):
    """Useful multiply-adds of one product over the visible pairs: D per pair and query head.

    x: (B, S/W, Hq, D), this rank's queries (or dout); half of ``attention_macs``' 2·D.
    """
    batch, _, heads_q, head_dim = x.shape
    return work.attention_macs(q_pos, k_pos, causal, batch, heads_q, head_dim) // 2


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float
) -> list[RankRecord]:
    """Run RSA on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S/W,) the global positions each rank owns. Each rank keeps q, k, v and its
    probabilities P (B, Hq, S/W, S) for backward (``saved_bytes``): O(S²/W).
    """
    out, lse, probs = _forward(world, q, k, v, positions, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, kr, vr, p))))
        for qr, kr, vr, o, l, p in zip(q, k, v, out, lse, probs)
    ]
    if dout is not None:
        grads = _backward(world, dout, q, k, v, probs, positions, causal, scale)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
