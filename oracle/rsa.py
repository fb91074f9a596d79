"""Ring Self-Attention (RSA, Li et al. 2021), emulated: full score rows, then rings of K and V.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): rank r fills its full score rows ``S^r: (B, Hq, S_r, S)`` block by
   block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions (and document
   ids, with packed documents).
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

- ``block(src)`` are the columns (or full-length gradient rows) of rank src's S_src keys, ranks
  in order (``[src·S/W, (src+1)·S/W)`` when W divides S; ``sptutor.padding.spans``), whatever
  the layout; masks always come from ``positions[src]`` and ``documents[src]``. Uneven shards
  need no padding: each block travels at its own size, and the all-reduced gradients are
  full-length (B, S, Hkv, D) on every rank.
- P is stored in the inputs' dtype, as the paper's code stores its softmax output, so the
  O(S²/W) memory is the paper's; it is computed in the accumulation dtype and rounded once, and
  the forward uses the stored P so that forward and backward agree.
- All-reduce, then keep own rows, as the paper does (so its byte count holds); a reduce-scatter
  would send half as much.
- A row that sees no key (possible only with custom positions) gets P 0 and lse -inf.
- Packed documents are ours too; a block of another document entirely is skipped.
- No division by W: Colossal-AI divides dQ, dK, dV by N, a scaling tied to its own gradient
  averaging; we return the true gradients.
- Causal masks and GQA are ours (the paper treats bidirectional multi-head attention only).
- Compute events count D multiply-adds per visible (query, key) pair and query head for each
  product: QK^T and PV forward; dV, dP, dK and dQ backward (no recomputation: P is stored).

Saved for backward per rank: its q, k, v shards and P (B, Hq, S_r, S).
Mirrors ``sptutor/rsa.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, padding, rows, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _forward(world, q, k, v, positions, documents, causal, scale):
    """q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); positions: W x (S_r,); documents:
    W x (S_r,) document ids, or W x None.

    Returns out: W x (B, S_r, Hq, D) in q's dtype, lse: W x (B, Hq, S_r) in the accumulation
    dtype, and probs: W x (B, Hq, S_r, S) in q's dtype (kept for backward).
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    spans = padding.spans([len(p) for p in positions])  # block(src): rank src's key columns
    seq_len = spans[-1].stop
    # (B, Hq, S_r, S): full score rows, -inf until a block fills them (masked blocks never are)
    scores = [torch.full((x.shape[0], x.shape[2], x.shape[1], seq_len), float("-inf"),
                         dtype=acc) for x in q]  # fmt: skip
    # BEGIN SOLUTION rsa ring of keys: fill the full score rows block by block as K travels
    k_from_prev_rank = [[k[rank]] for rank in range(W)]  # step 0: each rank's own
    for step in range(W):  # ring of keys (RingQK): S[:, :, block(src)] = scale·q·k_src^T
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = world.ring_shift(k_from_prev_rank, phase="forward", step=step)
        for rank in range(W):
            src = (rank - step) % W  # whose block this rank holds now
            (k_block,) = k_from_prev_rank[rank]
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                scores[rank][..., spans[src]] = rows.scores_block(
                    q[rank], k_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
                )
                world.compute(rank, _macs(q[rank], mine, theirs, causal), "forward", step,
                              block=src)  # fmt: skip
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
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                out[rank] += rows.weighted_block(probs[rank][..., spans[src]], v_block)
                world.compute(rank, _macs(q[rank], mine, theirs, causal), "forward", step,
                              block=src)  # fmt: skip
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    return [o.to(q[0].dtype) for o in out], list(lse), list(probs)


def _backward(world, dout, q, k, v, probs, positions, documents, causal, scale):
    """dout: W x (B, S_r, Hq, D); probs: W x (B, Hq, S_r, S) stored by the forward; q, k, v,
    positions, documents as in ``_forward``. Returns dq: W x (B, S_r, Hq, D) and dk, dv:
    W x (B, S_r, Hkv, D), in q's dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    spans = padding.spans([len(p) for p in positions])
    # BEGIN SOLUTION rsa backward of values: dV = P^T·dO all-reduced, then dP as V travels again
    # RingAV.backward: dV = P^T·dO all-reduced, then dP as V travels the ring again
    dv = _all_reduced_key_gradient(world, probs, dout, k[0].shape[2], 1.0, positions, documents,
                                   causal)  # fmt: skip
    dprobs = [torch.zeros(p.shape, dtype=acc) for p in probs]  # (B, Hq, S_r, S): full rows
    v_from_prev_rank = [[v[rank]] for rank in range(W)]
    for step in range(W):  # dP[:, :, block(src)] = dO·v_src^T; masked blocks stay 0 (P is 0)
        if step < W - 1:
            shift = world.ring_shift(v_from_prev_rank, phase="backward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            (v_block,) = v_from_prev_rank[rank]
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                dprobs[rank][..., spans[src]] = rows.dprobs_block(dout[rank], v_block)
                world.compute(rank, _macs(q[rank], mine, theirs, causal), "backward", step,
                              block=src)  # fmt: skip
        if step < W - 1:
            v_from_prev_rank = shift.wait()
    # END SOLUTION
    dscores = [rows.softmax_backward(probs[rank], dprobs[rank]) for rank in range(W)]
    # BEGIN SOLUTION rsa backward of keys: dK = scale·dS^T·Q all-reduced, then dQ as K travels again
    # RingQK.backward: dK = scale·dS^T·Q all-reduced, then dQ as K travels the ring again
    dk = _all_reduced_key_gradient(world, dscores, q, k[0].shape[2], scale, positions, documents,
                                   causal)  # fmt: skip
    dq = [torch.zeros(x.shape, dtype=acc) for x in q]
    k_from_prev_rank = [[k[rank]] for rank in range(W)]
    for step in range(W):  # dQ += scale·dS[:, :, block(src)]·k_src
        if step < W - 1:
            shift = world.ring_shift(k_from_prev_rank, phase="backward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            (k_block,) = k_from_prev_rank[rank]
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                dq[rank] += rows.weighted_block(dscores[rank][..., spans[src]], k_block) * scale
                world.compute(rank, _macs(q[rank], mine, theirs, causal), "backward", step,
                              block=src)  # fmt: skip
        if step < W - 1:
            k_from_prev_rank = shift.wait()
    # END SOLUTION
    dtype = q[0].dtype
    return [x.to(dtype) for x in dq], [x.to(dtype) for x in dk], [x.to(dtype) for x in dv]


def _all_reduced_key_gradient(world, weights, x, heads_kv, factor, positions, documents, causal):
    """``factor·weights^T·x`` for every key, summed over ranks; each rank keeps its own rows.

    weights: W x (B, Hq, S_r, S) (P for dV, dS for dK); x: W x (B, S_r, Hq, D) (dout for dV, q
    for dK). Returns W x (B, S_r, Hkv, D) in the accumulation dtype.
    """
    spans = padding.spans([len(p) for p in positions])
    # (S,) global position and document of each score column
    columns = torch.cat(positions), None if documents[0] is None else torch.cat(documents)
    shares = []  # W x (B, S, Hkv, D): each rank's queries' share of every key's gradient
    for rank in range(world.size):
        shares.append(factor * rows.key_gradient_share(weights[rank], x[rank], heads_kv))
        mine = (positions[rank], documents[rank])
        world.compute(rank, _macs(x[rank], mine, columns, causal), "backward")
    # all-reduce, then keep own rows, as the paper does (a reduce-scatter would send half)
    summed = world.all_reduce(shares, phase="backward")
    return [full[:, spans[rank]] for rank, full in enumerate(summed)]


def _macs(x, mine, theirs, causal):
    """Useful multiply-adds of one product over the visible pairs: D per pair and query head.

    x: (B, S_r, Hq, D), this rank's queries (or dout); ``mine``, ``theirs``: (positions,
    document ids or None) of the queries and of the keys; half of ``attention_macs``' 2·D.
    """
    batch, _, heads_q, head_dim = x.shape
    return work.attention_macs(mine[0], theirs[0], causal, batch, heads_q, head_dim,
                               q_doc=mine[1], k_doc=theirs[1]) // 2  # fmt: skip


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float
) -> list[RankRecord]:
    """Run RSA on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S_r,) the global positions each rank owns (shards may differ by a token);
    documents: W x (S_r,) their document ids, or W x None. Each rank keeps q, k, v and its
    probabilities P (B, Hq, S_r, S) for backward (``saved_bytes``): O(S²/W).
    """
    out, lse, probs = _forward(world, q, k, v, positions, documents, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, kr, vr, p))))
        for qr, kr, vr, o, l, p in zip(q, k, v, out, lse, probs)
    ]
    if dout is not None:
        grads = _backward(world, dout, q, k, v, probs, positions, documents, causal, scale)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
