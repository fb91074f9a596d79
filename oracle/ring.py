"""Ring attention, emulated: K and V blocks travel the ring, each rank merges by LSE.

Forward (W steps): at step s rank r holds the K, V block of rank ``src = (r - s) % W``, attends its
queries to it (masks from global positions) and merges the partial result by log-sum-exp (online
softmax); then every rank passes its block to the next rank (W-1 hops).

Backward (W steps): K and V travel the ring again (re-circulated, not stored) and the dK, dV
accumulators travel with them; each rank adds its block gradients (FlashAttention-2 form, with the
final out and LSE) into the accumulator it holds. After the last step one more hop brings each
accumulator home (W hops). An accumulator's hop starts at the end of a step and is waited for
only when the next step's block gradients are computed and ready to add, so on real devices it
travels during that compute.

Mirrors ``sptutor/ring.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _forward(world, q, k, v, positions, documents, causal, scale):
    """q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); positions: W x (S_r,) (shards may
    differ by a token); documents: W x (S_r,) document ids, or W x None.

    Returns out: W x (B, S_r, Hq, D) in q's dtype and lse: W x (B, Hq, S_r) in the accumulation
    dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    out = [torch.zeros(x.shape, dtype=acc) for x in q]
    lse = [torch.full((x.shape[0], x.shape[2], x.shape[1]), float("-inf"), dtype=acc) for x in q]
    # BEGIN SOLUTION ring forward: pass K, V on, attend to the block held, merge it by its LSE
    kv_from_prev_rank = [[k[rank], v[rank]] for rank in range(W)]  # step 0: each rank's own
    for step in range(W):
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = world.ring_shift(kv_from_prev_rank, phase="forward", step=step)
        for rank in range(W):
            src = (rank - step) % W  # whose block this rank holds now
            k_block, v_block = kv_from_prev_rank[rank]
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                block_out, block_lse = blocks.attention_block(
                    q[rank], k_block, v_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
                )
                world.compute(rank, _macs(q[rank], mine, theirs, causal), "forward", step,
                              block=src, result={"out": block_out, "lse": block_lse})  # fmt: skip
                # merge partial outputs by their LSE (online softmax)
                out[rank], lse[rank] = blocks.merge(out[rank], lse[rank], block_out, block_lse)
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
    # END SOLUTION
    return [o.to(q[0].dtype) for o in out], lse


def _backward(world, dout, q, k, v, out, lse, positions, documents, causal, scale):
    """dout, out: W x (B, S_r, Hq, D); lse: W x (B, Hq, S_r); the rest as in ``_forward``.

    Returns dq: W x (B, S_r, Hq, D) and dk, dv: W x (B, S_r, Hkv, D), in q's dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    dq = [torch.zeros(x.shape, dtype=acc) for x in q]
    # BEGIN SOLUTION ring backward: K, V travel again with the dK, dV accumulators; one hop home
    kv_from_prev_rank = [[k[rank], v[rank]] for rank in range(W)]
    dkv_from_prev_rank = [[torch.zeros(x.shape, dtype=acc) for _ in range(2)] for x in k]
    dkv_shift = None  # the accumulators on their way in, while this step computes
    for step in range(W):
        if step < W - 1:
            shift = world.ring_shift(kv_from_prev_rank, phase="backward", step=step)
        block_dkv = [None] * W  # each rank's block gradients, added once its accumulator is in
        for rank in range(W):
            src = (rank - step) % W
            k_block, v_block = kv_from_prev_rank[rank]
            mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
            if blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                block_dq, block_dk, block_dv = blocks.attention_block_backward(
                    dout[rank], q[rank], k_block, v_block, out[rank], lse[rank],
                    mine[0], theirs[0], causal, scale, mine[1], theirs[1],
                )  # fmt: skip
                world.compute(rank, _macs(q[rank], mine, theirs, causal, backward=True),
                              "backward", step, block=src,
                              result={"dq": block_dq, "dk": block_dk, "dv": block_dv})  # fmt: skip
                dq[rank] += block_dq
                block_dkv[rank] = (block_dk, block_dv)
        if dkv_shift is not None:  # only now wait for the accumulators of the blocks held
            dkv_from_prev_rank = dkv_shift.wait()
        for rank, grads in enumerate(block_dkv):
            if grads is not None:
                dk_acc, dv_acc = dkv_from_prev_rank[rank]
                dkv_from_prev_rank[rank] = [dk_acc + grads[0], dv_acc + grads[1]]
        # dK, dV accumulators travel with their block, during the next step's compute; after the
        # last step this hop brings them home
        dkv_shift = world.ring_shift(dkv_from_prev_rank, phase="backward", step=step)
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
    dkv_from_prev_rank = dkv_shift.wait()
    # END SOLUTION
    dtype = q[0].dtype
    dk, dv = zip(*dkv_from_prev_rank)
    return [x.to(dtype) for x in dq], [x.to(dtype) for x in dk], [x.to(dtype) for x in dv]


def _macs(q, mine, theirs, causal, backward=False):
    """Useful multiply-adds of this rank's queries against one block; ``mine``, ``theirs``:
    (positions, document ids or None) of the queries and of the block."""
    batch, _, heads_q, head_dim = q.shape
    return work.attention_macs(mine[0], theirs[0], causal, batch, heads_q, head_dim,
                               backward=backward, q_doc=mine[1], k_doc=theirs[1])  # fmt: skip


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float
) -> list[RankRecord]:
    """Run ring attention on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S_r,) the global positions each rank owns (shards may differ in length);
    documents: W x (S_r,) their document ids, or W x None (one document). Each rank keeps q, k,
    v, out and lse for backward (``saved_bytes``).
    """
    out, lse = _forward(world, q, k, v, positions, documents, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, kr, vr, o, l))))
        for qr, kr, vr, o, l in zip(q, k, v, out, lse)
    ]
    if dout is not None:
        grads = _backward(world, dout, q, k, v, out, lse, positions, documents, causal, scale)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
