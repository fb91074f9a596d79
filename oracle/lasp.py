"""LASP and LASP-2, emulated: linear attention whose only messages are D×D states.

Rank t holds chunk t of the sequence (contiguous layout: the state runs in sequence order).
Every rank first does the work that needs nothing from the others — the intra-chunk output
``[(Q K^T) ⊙ M] V`` and its chunk's local state ``sum_i decay^(C-1-i) k_i^T v_i`` — then:

- ``lasp`` (causal): a chain. Rank t receives ``KV_p0`` from rank t-1, hands
  ``KV_out = decay^C KV_p0 + local`` on to rank t+1 at once, then reads ``decay^(i+1) q_i KV_p0``.
  The received state is cached for backward ("state caching"), never recomputed or resent.
  Backward runs the chain in reverse: rank t receives dKV_out from rank t+1 and sends
  ``dKV_p0 = decay^C dKV_out + sum_i decay^(i+1) q_i^T dO_i`` to rank t-1.
- ``lasp2`` (causal): one all-gather of the local states; each rank combines those of the ranks
  before it (a prefix, ``KV_p0 = sum_{t'<t} decay^(C(t-1-t')) local_t'``) — the chain, done
  locally. Backward: one all-gather of the local dKV, combined over the ranks after it (a suffix).
- non-causal, both: the sum of every rank's ``K^T V`` (lasp: all-reduce; lasp2: all-gather and
  sum), read as ``q·KV_total``; backward the sum of every rank's ``Q^T dO`` the same way, then
  ``dk = v dKV^T``, ``dv = k dKV``.

States travel in the accumulation dtype (float32 for 16-bit inputs, as LASP keeps its kv in
float32), one per query head: ``(B, Hq, D, D)`` (see Design, *Linear attention*) — under GQA that is
Hq/Hkv times the state a per-K/V-head design would send; the linear kernels take the same state.
Each rank keeps its q, k, v shards and the state it read (state_in: the received or prefix state,
none on rank 0; non-causal the total) for backward, never the output.

Mirrors ``sptutor/lasp.py`` step for step; here index ``t`` of each list is rank t.
"""

from __future__ import annotations

import torch

from sptutor import blocks, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _macs(part, q):
    """Useful multiply-adds of one piece of this rank's chunk, q: (B, C, Hq, D)."""
    batch, chunk, heads_q, head_dim = q.shape
    return work.linear_macs(part, batch, heads_q, chunk, head_dim)


def _local_forward(world, q, k, v, decay, needs_state):
    """Work that waits for nobody: intra-chunk outputs, and local states where ``needs_state[t]``.

    Returns out: W x (B, C, Hq, D) and local_states: W x (B, Hq, D, D) or None.
    """
    out, local_states = [], []
    for rank in range(world.size):
        out.append(blocks.linear_chunk_intra(q[rank], k[rank], v[rank], decay))
        world.compute(rank, _macs("intra", q[rank]), "forward")
        local = None
        if needs_state[rank]:
            local = blocks.linear_local_state(k[rank], v[rank], decay, heads_q=q[rank].shape[2])
            world.compute(rank, _macs("local_state", q[rank]), "forward")
        local_states.append(local)
    return out, local_states


def _forward(world, q, k, v, decay):
    """LASP, causal. q: W x (B, C, Hq, D); k, v: W x (B, C, Hkv, D); decay: (Hq,) or None.

    Returns out: W x (B, C, Hq, D) (accumulation dtype) and state_in: W x (B, Hq, D, D) or None.
    """
    W, chunk = world.size, q[0].shape[1]
    # the last rank's state would go nowhere: it builds none
    out, local_states = _local_forward(world, q, k, v, decay, [r < W - 1 for r in range(W)])
    state_in = [None] * W
    for rank in range(W):  # the chain visits the chunks in sequence order
        kv_from_prev_rank = None
        if rank > 0:  # step rank-1: rank t waits for rank t-1
            kv_from_prev_rank = world.recv(rank - 1, rank)
        state_in[rank] = kv_from_prev_rank  # state caching: kept for backward, never resent
        if rank < W - 1:  # pass KV_out on first: the next rank waits for it, not for our output
            kv_out = blocks.linear_carry(kv_from_prev_rank, local_states[rank], decay, chunk)
            world.send(kv_out, rank, rank + 1, phase="forward", step=rank)
        if state_in[rank] is not None:
            out[rank] = out[rank] + blocks.linear_readout(q[rank], state_in[rank], decay)
            world.compute(rank, _macs("readout", q[rank]), "forward", step=rank)
    return out, state_in


def _local_backward(world, dout, q, k, v, state_in, decay, needs_dstate):
    """Work that waits for nobody: intra-chunk gradients, dq through the state read in forward,
    and the local dKV ``sum_i decay^(i+1) q_i^T dO_i`` where ``needs_dstate[t]``.

    Returns dq: W x (B, C, Hq, D), dk, dv: W x (B, C, Hkv, D), local_dstates: W x (B, Hq, D, D).
    """
    dq, dk, dv, local_dstates = [], [], [], []
    for rank in range(world.size):
        dq_rank, dk_rank, dv_rank = blocks.linear_chunk_intra_backward(
            dout[rank], q[rank], k[rank], v[rank], decay
        )
        world.compute(rank, _macs("intra_backward", q[rank]), "backward")
        if state_in[rank] is not None:  # the state read in forward is cached: no message needed
            dq_rank = dq_rank + blocks.linear_readout_backward(dout[rank], state_in[rank], decay)
            world.compute(rank, _macs("readout_backward", q[rank]), "backward")
        local = None
        if needs_dstate[rank]:
            local = blocks.linear_local_dstate(q[rank], dout[rank], decay)
            world.compute(rank, _macs("local_dstate", q[rank]), "backward")
        dq.append(dq_rank)
        dk.append(dk_rank)
        dv.append(dv_rank)
        local_dstates.append(local)
    return dq, dk, dv, local_dstates


def _add_state_gradients(world, rank, dk, dv, dkv_out, k, v, decay, step):
    """dk, dv of rank's local state, given dKV_out (None: no later chunk, nothing to add)."""
    if dkv_out is None:
        return
    dk_state, dv_state = blocks.linear_local_state_backward(dkv_out, k[rank], v[rank], decay)
    dk[rank], dv[rank] = dk[rank] + dk_state, dv[rank] + dv_state
    world.compute(rank, _macs("local_state_backward", k[rank]), "backward", step=step)


def _backward(world, dout, q, k, v, state_in, decay):
    """LASP, causal: the chain in reverse. dout like q; state_in as ``_forward`` returned it.

    Returns dq: W x (B, C, Hq, D), dk, dv: W x (B, C, Hkv, D) (accumulation dtype).
    """
    W, chunk = world.size, q[0].shape[1]
    # rank 0 read no state: it owes no dKV to anyone
    dq, dk, dv, local_dstates = _local_backward(
        world, dout, q, k, v, state_in, decay, [r > 0 for r in range(W)]
    )
    for rank in reversed(range(W)):  # the chain in reverse
        dkv_from_next_rank = None
        if rank < W - 1:  # step W-2-rank: rank t waits for rank t+1
            dkv_from_next_rank = world.recv(rank + 1, rank)
        dkv_out = dkv_from_next_rank  # the gradient of the KV this rank sent forward
        if rank > 0:  # pass dKV_p0 back first: the previous rank waits for it
            dkv_in = blocks.linear_carry(dkv_out, local_dstates[rank], decay, chunk)
            world.send(dkv_in, rank, rank - 1, phase="backward", step=W - 1 - rank)
        _add_state_gradients(world, rank, dk, dv, dkv_out, k, v, decay, W - 1 - rank)
    return dq, dk, dv


def _decayed_sum(states, decay, chunk):
    """``sum_n decay^(C(N-1-n)) states[n]`` by Horner — LASP's chain step, run locally."""
    total = None
    for state in states:
        total = blocks.linear_carry(total, state, decay, chunk)
    return total


def _forward_lasp2(world, q, k, v, decay):
    """LASP-2, causal: one all-gather of the local states, then a prefix on every rank.

    Shapes as in ``_forward``; state_in[t] is the prefix KV_p0 (None on rank 0), cached.
    """
    W, chunk = world.size, q[0].shape[1]
    # every rank contributes a state (the all-gather is symmetric), though no one reads the last
    out, local_states = _local_forward(world, q, k, v, decay, [True] * W)
    # the intra outputs never wait for this all-gather: LASP-2 overlaps the two
    gathered = world.all_gather(local_states, phase="forward")
    state_in = []
    for rank in range(W):
        # KV_p0 = sum over earlier ranks t' of decay^(C·(rank-1-t')) local_t'
        prefix = _decayed_sum(gathered[rank][:rank], decay, chunk)
        if prefix is not None:
            out[rank] = out[rank] + blocks.linear_readout(q[rank], prefix, decay)
            world.compute(rank, _macs("readout", q[rank]), "forward")
        state_in.append(prefix)
    return out, state_in


def _backward_lasp2(world, dout, q, k, v, state_in, decay):
    """LASP-2, causal: one all-gather of the local dKV, then a suffix on every rank."""
    W, chunk = world.size, q[0].shape[1]
    # every rank contributes a dKV (the all-gather is symmetric), though no one reads rank 0's
    dq, dk, dv, local_dstates = _local_backward(world, dout, q, k, v, state_in, decay, [True] * W)
    gathered = world.all_gather(local_dstates, phase="backward")
    for rank in range(W):
        # dKV_out = sum over later ranks t' of decay^(C·(t'-rank-1)) local_dKV_t'
        dkv_out = _decayed_sum(reversed(gathered[rank][rank + 1 :]), decay, chunk)
        _add_state_gradients(world, rank, dk, dv, dkv_out, k, v, decay, 0)
    return dq, dk, dv


def _all_reduce(world, states, phase):
    """LASP's non-causal sum of every rank's state: one all-reduce."""
    return world.all_reduce(states, phase=phase)


def _all_gather_and_sum(world, states, phase):
    """LASP-2's non-causal sum of every rank's state: one all-gather, then a local sum."""
    return [sum(gathered) for gathered in world.all_gather(states, phase=phase)]


def _forward_noncausal(world, q, k, v, total_of):
    """Non-causal: ``KV_total = sum_t K_t^T V_t`` (``total_of``: all-reduce, or all-gather and
    sum), read as ``q·KV_total``. Returns out and state_in = KV_total per rank (kept)."""
    local_states = []
    for rank in range(world.size):
        local_states.append(
            blocks.linear_local_state(k[rank], v[rank], None, heads_q=q[rank].shape[2])
        )
        world.compute(rank, _macs("local_state", q[rank]), "forward")
    totals = total_of(world, local_states, "forward")
    out = []
    for rank in range(world.size):
        out.append(blocks.linear_readout(q[rank], totals[rank], None))
        world.compute(rank, _macs("readout", q[rank]), "forward")
    return out, totals


def _backward_noncausal(world, dout, q, k, v, totals, total_of):
    """``dq = dO KV_total^T``; ``dKV_total = sum_t Q_t^T dO_t`` (summed like the forward);
    ``dk = V dKV_total^T``, ``dv = K dKV_total``."""
    dq, local_dstates = [], []
    for rank in range(world.size):
        dq.append(blocks.linear_readout_backward(dout[rank], totals[rank], None))
        local_dstates.append(blocks.linear_local_dstate(q[rank], dout[rank], None))
        macs = _macs("readout_backward", q[rank]) + _macs("local_dstate", q[rank])
        world.compute(rank, macs, "backward")
    dtotals = total_of(world, local_dstates, "backward")
    dk, dv = [], []
    for rank in range(world.size):
        dk_rank, dv_rank = blocks.linear_local_state_backward(dtotals[rank], k[rank], v[rank], None)
        dk.append(dk_rank)
        dv.append(dv_rank)
        world.compute(rank, _macs("local_state_backward", q[rank]), "backward")
    return dq, dk, dv


def _check_chain_order(positions):
    """Rank t must own the t-th chunk: the state runs through the sequence in order."""
    chunk = positions[0].shape[0]
    for rank, pos in enumerate(positions):
        if not torch.equal(pos.cpu(), torch.arange(rank * chunk, (rank + 1) * chunk)):
            raise ValueError(
                "lasp and lasp2 need the contiguous layout: the state runs through the sequence "
                f"in order, so rank r must own the r-th chunk, got rank {rank} with {pos.tolist()}"
            )


def _saved_bytes(q, k, v, state):
    """What a rank keeps for backward: its q, k, v shards and the state it read (if any)."""
    return sum(map(nbytes, (q, k, v))) + (0 if state is None else nbytes(state))


def _emulate(world, q, k, v, dout, positions, causal, decay, steps):
    """Run forward (and backward if dout) with ``steps`` = (forward, backward, total_of)."""
    _check_chain_order(positions)
    forward, backward, total_of = steps
    dtype = q[0].dtype
    if causal:
        out, state_in = forward(world, q, k, v, decay)
    else:
        out, state_in = _forward_noncausal(world, q, k, v, total_of)
    records = [
        RankRecord(out=o.to(dtype), state_in=state, saved_bytes=_saved_bytes(qr, kr, vr, state))
        for o, state, qr, kr, vr in zip(out, state_in, q, k, v)
    ]
    if dout is not None:
        if causal:
            grads = backward(world, dout, q, k, v, state_in, decay)
        else:
            grads = _backward_noncausal(world, dout, q, k, v, state_in, total_of)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq.to(dtype), dk.to(dtype), dv.to(dtype)
    return records


def emulate(
    world: World, q, k, v, dout, *, positions, causal: bool, decay: torch.Tensor | None
) -> list[RankRecord]:
    """Run LASP on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, C, Hq, D); k, v: W x (B, C, Hkv, D); dout: like q, or None (forward only);
    positions: W x (C,), contiguous (rank t owns chunk t); decay: (Hq,) or None (causal only).
    Causal: a chain of W-1 sends of KV (B, Hq, D, D) forward and W-1 of dKV backward.
    Non-causal: one all-reduce of K^T V forward, one of Q^T dO backward. ``state_in``: the
    received KV_p0 (None on rank 0), or KV_total non-causal; saved: q, k, v and state_in.
    """
    steps = (_forward, _backward, _all_reduce)
    return _emulate(world, q, k, v, dout, positions, causal, decay, steps)


def emulate_lasp2(
    world: World, q, k, v, dout, *, positions, causal: bool, decay: torch.Tensor | None
) -> list[RankRecord]:
    """Run LASP-2 on the emulated ``world``; arguments and records as in :func:`emulate`.

    One all-gather of the local states (B, Hq, D, D) forward and one of the local dKV backward,
    causal or not; ``state_in`` is the prefix KV_p0 each rank combined (None on rank 0), or
    KV_total non-causal; saved: q, k, v and state_in.
    """
    steps = (_forward_lasp2, _backward_lasp2, _all_gather_and_sum)
    return _emulate(world, q, k, v, dout, positions, causal, decay, steps)
