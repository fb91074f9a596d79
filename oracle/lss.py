"""LSS Transformer (Wang et al. 2023), emulated: a fused all-gather, then a fused reduce-scatter.

This is **our reading of the paper's abstract** (see Design, *What sptutor is*): its method section
was not available to us. The abstract promises "fused communication" and no aggregation of partial
self-attention; we read that as:

Forward:

1. One all-gather of the fused ``[K‖V]`` shard (K and V stacked into one tensor, so one
   collective per rank, not two). Every rank then holds K and V of the whole sequence and keeps
   them for backward — O(S·Hkv·D) memory per rank, the price of a single collective.
2. Local attention: this rank's queries against each of the W gathered blocks (masks from the
   block owner's global positions), merged by log-sum-exp (online softmax). Fully masked blocks
   are skipped. The output stays local: nothing is aggregated.

Backward:

1. Local gradients of every gathered block (FlashAttention-2 form with the final out and LSE):
   dq stays here; each block's dk, dv belong to the rank that owns those keys.
2. One reduce-scatter of the fused ``[dK‖dV]`` (accumulation dtype) sums every rank's share of
   each block and delivers it to its owner.

Uneven shards (W does not divide S): both collectives move one chunk size, so each rank pads its
[K‖V] (and its shares of [dK‖dV]) to the largest shard, ``L = ceil(S/W)``, and drops the padding
of each block after (``sptutor.padding``): padding travels, and stays in the gathered buffer kept
for backward, but is never attended. Packed documents mask blocks as positions do: a block of
another document entirely is skipped.

Messages of every rank, in order: forward one all_gather, backward one reduce_scatter (step 0).
It is exact attention by construction (the same sums as full attention, regrouped), whatever the
paper itself does; its own exactness claim could not be checked. The abstract's "double gradient
averaging" is, on our reading, about weight gradients over SP x DP, outside attention: not here.

Saved for backward per rank: q, out, lse and the gathered K, V of all W blocks (W·L tokens).
Mirrors ``sptutor/lss.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, padding, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _forward(world, q, k, v, positions, documents, causal, scale):
    """q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); positions: W x (S_r,); documents:
    W x (S_r,) document ids, or W x None.

    Returns out: W x (B, S_r, Hq, D) in q's dtype, lse: W x (B, Hq, S_r) in the accumulation
    dtype, and kv_gathered: W x (W, 2, B, L, Hkv, D) (kept for backward), L = max S_r.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    sizes = [len(p) for p in positions]
    # BEGIN SOLUTION lss forward: one all-gather of [K‖V], attend to every block, merge by LSE
    # K and V stacked into one tensor, so that one collective moves both; padded to L tokens
    fused = [padding.pad(torch.stack((k[rank], v[rank])), max(sizes), dim=2) for rank in range(W)]
    # kept as gathered: the buffer the collective filled is the one saved for backward
    kv_gathered = world.all_gather(fused, phase="forward")  # W x (W, 2, B, L, Hkv, D)
    out = [torch.zeros(x.shape, dtype=acc) for x in q]
    lse = [torch.full((x.shape[0], x.shape[2], x.shape[1]), float("-inf"), dtype=acc) for x in q]
    for rank in range(W):
        mine = (positions[rank], documents[rank])
        # kv_gathered[rank][src] is rank src's [K‖V] as this rank received it
        for src, kv in enumerate(kv_gathered[rank]):
            theirs = (positions[src], documents[src])
            if not blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                continue  # fully masked (by positions or documents): nothing to compute
            k_block, v_block = padding.unpad(kv, sizes[src], dim=2)  # the padding dropped
            block_out, block_lse = blocks.attention_block(
                q[rank], k_block, v_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
            )
            world.compute(rank, _macs(q[rank], mine, theirs, causal), "forward", block=src,
                          result={"out": block_out, "lse": block_lse})  # fmt: skip
            # merge partial outputs by their LSE (online softmax)
            out[rank], lse[rank] = blocks.merge(out[rank], lse[rank], block_out, block_lse)
    # END SOLUTION
    return [o.to(q[0].dtype) for o in out], lse, kv_gathered


def _backward(world, dout, q, kv_gathered, out, lse, positions, documents, causal, scale):
    """dout, out: W x (B, S_r, Hq, D); lse: W x (B, Hq, S_r); kv_gathered as ``_forward`` kept
    it; positions, documents as there.

    Returns dq: W x (B, S_r, Hq, D) and dk, dv: W x (B, S_r, Hkv, D), in q's dtype.
    """
    W = world.size
    acc = blocks.accumulation_dtype(q[0].dtype)
    sizes = [len(p) for p in positions]
    dq = [torch.zeros(x.shape, dtype=acc) for x in q]
    # BEGIN SOLUTION lss backward: every block's gradients, one reduce-scatter of [dK‖dV]
    # dkv_shares[rank][src]: rank's share of src's [dK‖dV], (2, B, L, Hkv, D); 0 if masked
    dkv_shares = [[torch.zeros(kv.shape, dtype=acc) for kv in held] for held in kv_gathered]
    for rank in range(W):
        mine = (positions[rank], documents[rank])
        for src, kv in enumerate(kv_gathered[rank]):
            theirs = (positions[src], documents[src])
            if not blocks.any_visible(mine[0], theirs[0], causal, mine[1], theirs[1]):
                continue
            k_block, v_block = padding.unpad(kv, sizes[src], dim=2)
            block_dq, block_dk, block_dv = blocks.attention_block_backward(
                dout[rank], q[rank], k_block, v_block, out[rank], lse[rank],
                mine[0], theirs[0], causal, scale, mine[1], theirs[1],
            )  # fmt: skip
            world.compute(
                rank, _macs(q[rank], mine, theirs, causal, backward=True), "backward",
                block=src, result={"dq": block_dq, "dk": block_dk, "dv": block_dv},
            )  # fmt: skip
            dq[rank] += block_dq
            share = torch.stack((block_dk, block_dv))  # (2, B, S_src, Hkv, D)
            dkv_shares[rank][src] = padding.pad(share, max(sizes), dim=2)
    # one fused reduce-scatter: the owner of each block receives the sum of every rank's share
    dkv = world.reduce_scatter(dkv_shares, phase="backward")  # W x (2, B, L, Hkv, D)
    dkv = [padding.unpad(x, size, dim=2) for x, size in zip(dkv, sizes)]  # (2, B, S_r, Hkv, D)
    # END SOLUTION
    dtype = q[0].dtype
    return [x.to(dtype) for x in dq], [x[0].to(dtype) for x in dkv], [x[1].to(dtype) for x in dkv]


def _macs(q, mine, theirs, causal, backward=False):
    """Useful multiply-adds of this rank's queries against one block; ``mine``, ``theirs``:
    (positions, document ids or None) of the queries and of the block."""
    batch, _, heads_q, head_dim = q.shape
    return work.attention_macs(mine[0], theirs[0], causal, batch, heads_q, head_dim,
                               backward=backward, q_doc=mine[1], k_doc=theirs[1])  # fmt: skip


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float
) -> list[RankRecord]:
    """Run LSS (our reading) on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S_r,) the global positions each rank owns (shards may differ by a token);
    documents: W x (S_r,) their document ids, or W x None. Each rank keeps q, out, lse and the
    gathered K, V of the whole sequence (padded: W·L tokens) for backward (``saved_bytes``): O(S).
    """
    out, lse, kv_gathered = _forward(world, q, k, v, positions, documents, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, o, l, kv))))
        for qr, o, l, kv in zip(q, out, lse, kv_gathered)
    ]
    if dout is not None:
        grads = _backward(
            world, dout, q, kv_gathered, out, lse, positions, documents, causal, scale
        )
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
