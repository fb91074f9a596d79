"""Ring attention, emulated: K and V blocks travel the ring, each rank merges by LSE.

Forward (W steps): at step s rank r holds the K, V block of rank ``src = (r - s) % W``, attends its
queries to it (masks from global positions) and merges the partial result by log-sum-exp (online
softmax); then every rank passes its block to the next rank (W-1 hops).

Backward (W steps): K and V travel the ring again (re-circulated, not stored) and the dK, dV
accumulators travel with them; each rank adds its block gradients (FlashAttention-2 form, with the
final out and LSE) into the accumulator it holds. After the last step one more hop brings each
accumulator home (W hops).

Mirrors ``sptutor/ring.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _forward(world, q, k, v, positions, causal, scale):
    """q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); positions: W x (S/W,).

    Returns out: W x (B, S/W, Hq, D) in q's dtype and lse: W x (B, Hq, S/W) in the accumulation
    dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    batch, seq_local, heads_q, _ = q[0].shape
    out = [torch.zeros(x.shape, dtype=acc) for x in q]
    lse = [torch.full((batch, heads_q, seq_local), float("-inf"), dtype=acc) for _ in q]
    # BEGIN SOLUTION ring forward: pass K, V on, attend to the block held, merge it by its LSE
    kv_from_prev_rank = [[k[rank], v[rank]] for rank in range(W)]  # step 0: each rank's own
    for step in range(W):
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = world.ring_shift(kv_from_prev_rank, phase="forward", step=step)
        for rank in range(W):
            src = (rank - step) % W  # whose block this rank holds now
            k_block, v_block = kv_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                block_out, block_lse = blocks.attention_block(
                    q[rank], k_block, v_block, positions[rank], positions[src], causal, scale
                )
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal),
                              "forward", step, block=src,
                              result={"out": block_out, "lse": block_lse})  # fmt: skip
                # merge partial outputs by their LSE (online softmax)
                out[rank], lse[rank] = blocks.merge(out[rank], lse[rank], block_out, block_lse)
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
    # END SOLUTION
    return [o.to(q[0].dtype) for o in out], lse


def _backward(world, dout, q, k, v, out, lse, positions, causal, scale):
    """dout, out: W x (B, S/W, Hq, D); lse: W x (B, Hq, S/W); q, k, v as in ``_forward``.

    Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D), in q's dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    dq = [torch.zeros(x.shape, dtype=acc) for x in q]
    # BEGIN SOLUTION ring backward: K, V travel again with the dK, dV accumulators; one hop home
    kv_from_prev_rank = [[k[rank], v[rank]] for rank in range(W)]
    dkv_from_prev_rank = [[torch.zeros(x.shape, dtype=acc) for _ in range(2)] for x in k]
    for step in range(W):
        if step < W - 1:
            shift = world.ring_shift(kv_from_prev_rank, phase="backward", step=step)
        for rank in range(W):
            src = (rank - step) % W
            k_block, v_block = kv_from_prev_rank[rank]
            if blocks.any_visible(positions[rank], positions[src], causal):
                block_dq, block_dk, block_dv = blocks.attention_block_backward(
                    dout[rank], q[rank], k_block, v_block, out[rank], lse[rank],
                    positions[rank], positions[src], causal, scale,
                )  # fmt: skip
                world.compute(rank, _macs(q[rank], positions[rank], positions[src], causal,
                                          backward=True), "backward", step, block=src,
                              result={"dq": block_dq, "dk": block_dk, "dv": block_dv})  # fmt: skip
                dq[rank] += block_dq
                dk_acc, dv_acc = dkv_from_prev_rank[rank]
                dkv_from_prev_rank[rank] = [dk_acc + block_dk, dv_acc + block_dv]
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
        # dK, dV accumulators travel with their block; after the last step this hop brings them home
        dkv_shift = world.ring_shift(dkv_from_prev_rank, phase="backward", step=step)
        dkv_from_prev_rank = dkv_shift.wait()
    # END SOLUTION
    dtype = q[0].dtype
    dk, dv = zip(*dkv_from_prev_rank)
    return [x.to(dtype) for x in dq], [x.to(dtype) for x in dk], [x.to(dtype) for x in dv]


def _macs(q, q_pos, k_pos, causal, backward=False):
    """Useful multiply-adds of this rank's queries against one block."""
    batch, _, heads_q, head_dim = q.shape
    return work.attention_macs(q_pos, k_pos, causal, batch, heads_q, head_dim, backward=backward)


def emulate(
    world: World, q, k, v, dout, *, positions, causal: bool, scale: float
) -> list[RankRecord]:
    """Run ring attention on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S/W,) the global positions each rank owns. Each rank keeps q, k, v, out and
    lse for backward (``saved_bytes``).
    """
    out, lse = _forward(world, q, k, v, positions, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, kr, vr, o, l))))
        for qr, kr, vr, o, l in zip(q, k, v, out, lse)
    ]
    if dout is not None:
        grads = _backward(world, dout, q, k, v, out, lse, positions, causal, scale)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
