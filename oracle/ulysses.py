"""DeepSpeed-Ulysses, emulated: all-to-all from sequence to heads, local attention, all-to-all back.

The Ulysses degree U is the number of ranks that split the heads: here all of them (U = W).
Forward: each rank holds its S_r tokens of every head. One all-to-all per tensor (q, k, v) scatters
the heads and gathers the sequence, so rank j holds all S tokens of head group j (heads
``[j·H/U, (j+1)·H/U)``), in rank order: its positions are ``cat(positions[0..W-1])``, its
document ids ``cat(documents)``. It runs full-sequence attention on its heads (masks from those
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

Mirrors ``sptutor/ulysses.py`` step for step; here index ``r`` of each list is rank r.
``oracle/usp.py`` runs the all-to-all steps here inside each ulysses group of U ranks (there the
gathered sequence is the group's T_i tokens, not all S).
"""

from __future__ import annotations

import torch

from sptutor import blocks, heads, padding, work
from sptutor.checks import check_ulysses_heads
from sptutor.oracle.world import RankRecord, World, nbytes


def _seq_to_heads(world, x, sizes, *, phase):
    """One all-to-all, sequence -> heads: x: U x (B, S_r, H, D) -> U x (B, S, H/U, D).

    sizes: the U shard lengths S_r. Each shard is padded to L = max(sizes) (equal chunks); rank i
    sends its head group j to rank j; rank j drops each piece's padding and concatenates the U
    pieces in rank order.
    """
    # BEGIN SOLUTION ulysses sequence to heads: send head group j to rank j, gather the sequence
    degree = world.size
    padded = [padding.pad(x[rank], max(sizes)) for rank in range(degree)]  # U x (B, L, H, D)
    B, L, H, D = padded[0].shape
    # (B, L, H, D) -> (B, L, U, H/U, D) -> U x (B, L, H/U, D), piece j for rank j
    chunks = [list(p.reshape(B, L, degree, H // degree, D).unbind(2)) for p in padded]
    received = world.all_to_all(chunks, phase=phase)
    return [padding.join(received[rank], sizes) for rank in range(degree)]  # (B, S, H/U, D)
    # END SOLUTION


def _heads_to_seq(world, x, sizes, *, phase):
    """One all-to-all, heads -> sequence: x: U x (B, S, H/U, D) -> U x (B, S_r, H, D).

    Rank j sends rank i its tokens (the i-th of the ``sizes`` slices, padded to L) of head group
    j; rank i stacks the groups and drops the padding.
    """
    # BEGIN SOLUTION ulysses heads to sequence: send rank i its tokens of our heads, stack the heads
    degree = world.size
    chunks = [padding.split(x[rank], sizes) for rank in range(degree)]  # U x (B, L, H/U, D)
    received = world.all_to_all(chunks, phase=phase)
    stacked = [torch.cat(received[rank], dim=2) for rank in range(degree)]  # (B, L, H, D)
    return [padding.unpad(x, size) for x, size in zip(stacked, sizes)]  # (B, S_r, H, D)
    # END SOLUTION


def _qkv_to_heads(world, q, k, v, sizes):
    """The forward all-to-alls of q, k, v (in that order), K/V heads replicated when Hkv < U.

    q: U x (B, S_r, Hq, D); k, v: U x (B, S_r, Hkv, D); sizes: the U shard lengths S_r.
    Returns q: U x (B, S, Hq/U, D) and k, v: U x (B, S, max(Hkv/U, 1), D).
    """
    replicas = heads.replicas(k[0].shape[2], world.size)
    # replica j goes to rank j and is K/V head j // rep, the one shared (h // (Hq/Hkv)) by rank j's
    # query heads j·Hq/U ... (j+1)·Hq/U - 1, since rep = U/Hkv query-head groups fill one K/V group
    k = [x.repeat_interleave(replicas, dim=2) for x in k]  # (B, S_r, Hkv·rep, D)
    v = [x.repeat_interleave(replicas, dim=2) for x in v]  # (B, S_r, Hkv·rep, D)
    q_heads = _seq_to_heads(world, q, sizes, phase="forward")
    k_heads = _seq_to_heads(world, k, sizes, phase="forward")
    v_heads = _seq_to_heads(world, v, sizes, phase="forward")
    return q_heads, k_heads, v_heads


def _grads_to_seq(world, dq, dk, dv, sizes, heads_kv):
    """The backward all-to-alls of dq, dk, dv (in that order), then the K/V replicas summed.

    dq: U x (B, S, Hq/U, D); dk, dv: U x (B, S, max(Hkv/U, 1), D); sizes: the U shard lengths;
    heads_kv: Hkv before replication. Returns dq: U x (B, S_r, Hq, D), dk, dv: U x (B, S_r, Hkv, D).
    """
    replicas = heads.replicas(heads_kv, world.size)
    dq = _heads_to_seq(world, dq, sizes, phase="backward")
    dk = _heads_to_seq(world, dk, sizes, phase="backward")
    dv = _heads_to_seq(world, dv, sizes, phase="backward")
    dk = [heads.sum_replicas(x, replicas) for x in dk]  # (B, S_r, Hkv, D)
    dv = [heads.sum_replicas(x, replicas) for x in dv]  # (B, S_r, Hkv, D)
    return dq, dk, dv


def _lse_for_checking(lse_heads, sizes):
    """Each rank's LSE for its own tokens, read from the other ranks' state (no message logged).

    lse_heads: U x (B, Hq/U, S), head group j over the gathered sequence; sizes: the U S_r.
    Returns U x (B, Hq, S_r): rank i's tokens are the i-th slice of the gathered sequence.
    """
    spans = padding.spans(sizes)
    return [torch.cat([x[..., span] for x in lse_heads], dim=1) for span in spans]


def _forward(world, q, k, v, positions, documents, causal, scale):
    """q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); positions: W x (S_r,); documents:
    W x (S_r,) document ids, or W x None.

    Returns out: W x (B, S_r, Hq, D) in q's dtype, and what each rank keeps for backward, all in
    the heads layout: q: (B, S, Hq/U, D), k, v: (B, S, max(Hkv/U, 1), D), out like q, lse:
    (B, Hq/U, S), each a list over ranks.
    """
    sizes = [len(p) for p in positions]
    sequence = torch.cat(positions)  # (S,) the gathered tokens, in rank order
    (sequence_docs,) = heads.gathered_documents(documents, len(documents))  # (S,) or None
    q_heads, k_heads, v_heads = _qkv_to_heads(world, q, k, v, sizes)
    out_heads, lse_heads = [None] * world.size, [None] * world.size
    for rank in range(world.size):
        # full-sequence attention on this rank's heads
        out_heads[rank], lse_heads[rank] = blocks.attention_block(
            q_heads[rank], k_heads[rank], v_heads[rank], sequence, sequence, causal, scale,
            sequence_docs, sequence_docs,
        )  # fmt: skip
        world.compute(rank, _macs(q_heads[rank], sequence, sequence_docs, causal), "forward")
        out_heads[rank] = out_heads[rank].to(q[rank].dtype)  # (B, S, Hq/U, D), sent in q's dtype
    out = _heads_to_seq(world, out_heads, sizes, phase="forward")
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)


def _backward(world, dout, saved, positions, documents, causal, scale, heads_kv):
    """dout: W x (B, S_r, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs.

    Returns dq: W x (B, S_r, Hq, D) and dk, dv: W x (B, S_r, Hkv, D), in dout's dtype.
    """
    # BEGIN SOLUTION ulysses backward: dout to heads, the local backward, dq, dk, dv back
    sizes = [len(p) for p in positions]
    sequence = torch.cat(positions)  # (S,)
    (sequence_docs,) = heads.gathered_documents(documents, len(documents))  # (S,) or None
    q_heads, k_heads, v_heads, out_heads, lse_heads = saved
    dout_heads = _seq_to_heads(world, dout, sizes, phase="backward")  # (B, S, Hq/U, D)
    dq_heads, dk_heads, dv_heads = [None] * world.size, [None] * world.size, [None] * world.size
    for rank in range(world.size):
        grads = blocks.attention_block_backward(
            dout_heads[rank], q_heads[rank], k_heads[rank], v_heads[rank],
            out_heads[rank], lse_heads[rank], sequence, sequence, causal, scale,
            sequence_docs, sequence_docs,
        )  # fmt: skip
        world.compute(rank, _macs(q_heads[rank], sequence, sequence_docs, causal, backward=True),
                      "backward")  # fmt: skip
        # final gradients, sent in the input dtype (see the module docstring)
        dq_heads[rank], dk_heads[rank], dv_heads[rank] = (g.to(dout[rank].dtype) for g in grads)
    return _grads_to_seq(world, dq_heads, dk_heads, dv_heads, sizes, heads_kv)
    # END SOLUTION


def _macs(q_heads, sequence, sequence_docs, causal, backward=False):
    """Useful multiply-adds of one rank's heads over the whole sequence (pairs within a
    document only)."""
    batch, _, heads_q, head_dim = q_heads.shape
    return work.attention_macs(
        sequence, sequence, causal, batch, heads_q, head_dim, backward=backward,
        q_doc=sequence_docs, k_doc=sequence_docs,
    )  # fmt: skip


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float
) -> list[RankRecord]:
    """Run DeepSpeed-Ulysses on the emulated ``world`` (U = W); returns one ``RankRecord`` per rank.

    q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S_r,) (shards may differ by a token); documents: W x (S_r,) document ids, or
    W x None. Each rank keeps its heads-layout q, k, v, out and lse for backward: O(S/W)
    (``saved_bytes``, ``sptutor.cost.ulysses``).
    """
    heads_kv = k[0].shape[2]
    check_ulysses_heads(q[0].shape[2], heads_kv, world.size)
    out, saved = _forward(world, q, k, v, positions, documents, causal, scale)
    lse = _lse_for_checking(saved[-1], [len(p) for p in positions])
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(nbytes(x[rank]) for x in saved))
        for rank, (o, l) in enumerate(zip(out, lse))
    ]
    if dout is not None:
        grads = _backward(world, dout, saved, positions, documents, causal, scale, heads_kv)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
