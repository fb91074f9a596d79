"""DeepSpeed-Ulysses, emulated: all-to-all from sequence to heads, local attention, all-to-all back.

Forward: each rank holds S/W tokens of every head. One all-to-all per tensor (q, k, v) scatters the
heads and gathers the sequence, so rank j holds all S tokens of head group j (heads
``[j·H/W, (j+1)·H/W)``), in rank order: its positions are ``cat(positions[0..W-1])``.
It runs full-sequence attention on its heads (masks from those global positions, so every layout
works), and one more all-to-all sends each rank's tokens of ``out`` back: heads -> sequence.

Backward mirrors it: an all-to-all of dout (sequence -> heads), the local FlashAttention-2 backward
with the final out and LSE this rank already holds in the heads layout, then all-to-alls of dq, dk,
dv back (heads -> sequence). Gradients go on the wire in the input dtype, like out: each is already
final when sent (the local backward summed over every key), so rounding before or after the
all-to-all is the same rounding, and the four backward all-to-alls cost what the four forward do.

GQA: K/V heads split over the ranks when ``Hkv % W == 0``. When ``W % Hkv == 0`` (fewer K/V heads
than ranks, e.g. MQA) each K/V head is first replicated W/Hkv times, so rank j gets replica j = K/V
head ``j // (W/Hkv)``: exactly the head its query heads need under GQA's ``h // (Hq/Hkv)``. The
replicas' dK, dV are summed after the backward all-to-all.

Mirrors ``sptutor/ulysses.py`` step for step; ``oracle/usp.py`` reuses the all-to-all steps here.
"""

from __future__ import annotations

import torch

from sptutor import blocks, work
from sptutor.checks import check_ulysses_heads
from sptutor.oracle.world import RankRecord, World, nbytes


def _replicas(heads_kv: int, degree: int) -> int:
    """How many copies of each K/V head go on the wire: W/Hkv when Hkv < W, else 1."""
    return max(1, degree // heads_kv)


def _seq_to_heads(world, x, *, phase):
    """One all-to-all, sequence -> heads: x: W x (B, S/W, H, D) -> W x (B, S, H/W, D).

    Rank i sends its head group j to rank j; rank j concatenates the W pieces in rank order.
    """
    W = world.size
    chunks = []
    for x_rank in x:
        B, S_local, H, D = x_rank.shape
        # (B, S/W, H, D) -> (B, S/W, W, H/W, D) -> W x (B, S/W, H/W, D), piece j for rank j
        chunks.append(list(x_rank.reshape(B, S_local, W, H // W, D).unbind(2)))
    received = world.all_to_all(chunks, phase=phase)
    return [torch.cat(pieces, dim=1) for pieces in received]  # (B, S, H/W, D)


def _heads_to_seq(world, x, *, phase):
    """One all-to-all, heads -> sequence: x: W x (B, S, H/W, D) -> W x (B, S/W, H, D).

    Rank j sends rank i's tokens (the i-th S/W slice) of its head group; rank i stacks the groups.
    """
    W = world.size
    chunks = [list(x_rank.chunk(W, dim=1)) for x_rank in x]  # W x W x (B, S/W, H/W, D)
    received = world.all_to_all(chunks, phase=phase)
    return [torch.cat(groups, dim=2) for groups in received]  # (B, S/W, H, D)


def _qkv_to_heads(world, q, k, v):
    """The forward all-to-alls of q, k, v (in that order), K/V heads replicated when Hkv < W.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D).
    Returns q: W x (B, S, Hq/W, D) and k, v: W x (B, S, max(Hkv/W, 1), D).
    """
    replicas = _replicas(k[0].shape[2], world.size)
    # replica j goes to rank j and is K/V head j // rep, the one shared (h // (Hq/Hkv)) by rank j's
    # query heads j·Hq/W ... (j+1)·Hq/W - 1, since rep = W/Hkv query-head groups fill one K/V group
    k = [x.repeat_interleave(replicas, dim=2) for x in k]  # (B, S/W, Hkv·rep, D)
    v = [x.repeat_interleave(replicas, dim=2) for x in v]  # (B, S/W, Hkv·rep, D)
    q_heads = _seq_to_heads(world, q, phase="forward")
    k_heads = _seq_to_heads(world, k, phase="forward")
    v_heads = _seq_to_heads(world, v, phase="forward")
    return q_heads, k_heads, v_heads


def _sum_replicas(x, replicas):
    """(B, S/W, Hkv·rep, D) -> (B, S/W, Hkv, rep, D) -> (B, S/W, Hkv, D), added in the
    accumulation dtype: the gradient of a replicated head is the sum over its replicas.
    """
    B, S_local, H, D = x.shape
    acc = blocks.accumulation_dtype(x.dtype)
    return x.reshape(B, S_local, H // replicas, replicas, D).sum(dim=3, dtype=acc).to(x.dtype)


def _grads_to_seq(world, dq, dk, dv, heads_kv):
    """The backward all-to-alls of dq, dk, dv (in that order), then the K/V replicas summed.

    dq: W x (B, S, Hq/W, D); dk, dv: W x (B, S, max(Hkv/W, 1), D); heads_kv: Hkv before replication.
    Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D).
    """
    replicas = _replicas(heads_kv, world.size)
    dq = _heads_to_seq(world, dq, phase="backward")
    dk = _heads_to_seq(world, dk, phase="backward")
    dv = _heads_to_seq(world, dv, phase="backward")
    return dq, [_sum_replicas(g, replicas) for g in dk], [_sum_replicas(g, replicas) for g in dv]


def _lse_for_checking(lse_heads):
    """Each rank's LSE for its own tokens, read from the other ranks' state (no message logged).

    lse_heads: W x (B, Hq/W, S), head group j over the gathered sequence.
    Returns W x (B, Hq, S/W): rank i's tokens are the i-th S/W slice of the gathered sequence.
    """
    W = len(lse_heads)
    pieces = [x.chunk(W, dim=2) for x in lse_heads]  # pieces[j][i]: (B, Hq/W, S/W)
    return [torch.cat([pieces[j][i] for j in range(W)], dim=1) for i in range(W)]


def _macs(q_heads, sequence, causal, backward=False):
    """Useful multiply-adds of one rank's heads over the whole sequence."""
    batch, _, heads, head_dim = q_heads.shape
    return work.attention_macs(
        sequence, sequence, causal, batch, heads, head_dim, backward=backward
    )


def _forward(world, q, k, v, positions, causal, scale):
    """q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); positions: W x (S/W,).

    Returns out: W x (B, S/W, Hq, D) in q's dtype, and what each rank keeps for backward, all in
    the heads layout: q: (B, S, Hq/W, D), k, v: (B, S, max(Hkv/W, 1), D), out like q, lse:
    (B, Hq/W, S), each a list over ranks.
    """
    sequence = torch.cat(positions)  # (S,) the gathered tokens, in rank order
    q_heads, k_heads, v_heads = _qkv_to_heads(world, q, k, v)
    out_heads, lse_heads = [], []
    for rank in range(world.size):
        out, lse = blocks.attention_block(
            q_heads[rank], k_heads[rank], v_heads[rank], sequence, sequence, causal, scale
        )  # full-sequence attention on this rank's heads
        world.compute(rank, _macs(q_heads[rank], sequence, causal), "forward")
        out_heads.append(out.to(q[0].dtype))  # (B, S, Hq/W, D)
        lse_heads.append(lse)  # (B, Hq/W, S)
    out = _heads_to_seq(world, out_heads, phase="forward")
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)


def _backward(world, dout, saved, positions, causal, scale, heads_kv):
    """dout: W x (B, S/W, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs.

    Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D), in dout's dtype.
    """
    sequence = torch.cat(positions)  # (S,)
    q_heads, k_heads, v_heads, out_heads, lse_heads = saved
    dout_heads = _seq_to_heads(world, dout, phase="backward")  # W x (B, S, Hq/W, D)
    grads_heads = []
    for rank in range(world.size):
        grads = blocks.attention_block_backward(
            dout_heads[rank], q_heads[rank], k_heads[rank], v_heads[rank],
            out_heads[rank], lse_heads[rank], sequence, sequence, causal, scale,
        )  # fmt: skip
        world.compute(rank, _macs(q_heads[rank], sequence, causal, backward=True), "backward")
        # final gradients, sent in the input dtype (see the module docstring)
        grads_heads.append([g.to(dout[0].dtype) for g in grads])
    dq_heads, dk_heads, dv_heads = (list(g) for g in zip(*grads_heads))  # W x (B, S, H/W, D)
    return _grads_to_seq(world, dq_heads, dk_heads, dv_heads, heads_kv)


def emulate(
    world: World, q, k, v, dout, *, positions, causal: bool, scale: float
) -> list[RankRecord]:
    """Run DeepSpeed-Ulysses on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S/W,). Each rank keeps its heads-layout q, k, v, out and lse for backward:
    O(S/W) (``saved_bytes``, ``sptutor.cost.ulysses``).
    """
    heads_kv = k[0].shape[2]
    check_ulysses_heads(q[0].shape[2], heads_kv, world.size)
    out, saved = _forward(world, q, k, v, positions, causal, scale)
    lse = _lse_for_checking(saved[-1])
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(nbytes(x[rank]) for x in saved))
        for rank, (o, l) in enumerate(zip(out, lse))
    ]
    if dout is not None:
        grads = _backward(world, dout, saved, positions, causal, scale, heads_kv)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
