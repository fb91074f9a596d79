"""LASP, emulated: linear attention whose only messages are D×D states, on a chain.

Rank t holds chunk t of the sequence (contiguous layout: the state runs in sequence order; C_t
tokens, which may differ by one). Every rank first does the work that needs nothing from the
others — the intra-chunk output ``[(Q K^T) ⊙ M] V`` and its chunk's local state
``sum_i decay^(C-1-i) k_i^T v_i`` — then, causal, a chain: rank t receives ``KV_p0`` from rank
t-1, hands ``KV_out = decay^C KV_p0 + local`` on to rank t+1 at once, then reads
``decay^(i+1) q_i KV_p0``. The received state is cached for backward ("state caching"), never
recomputed or resent. Backward runs the chain in reverse: rank t receives dKV_out from rank t+1
and sends ``dKV_p0 = decay^C dKV_out + sum_i decay^(i+1) q_i^T dO_i`` to rank t-1. Non-causal:
one all-reduce of every rank's ``K^T V``, read as ``q·KV_total``; backward one all-reduce of
``Q^T dO``, then ``dk = v dKV^T``, ``dv = k dKV``.

Packed documents (causal only) cut the state (``sptutor.chain``): each chunk runs as segments, its
runs of one document; only a first segment that continues the previous chunk's document reads
KV_p0, KV_out is the last segment's (with KV_p0 carried only through a chunk of one continued
document), and dKV flows back the same way. The same messages travel whatever the documents.

States travel in the accumulation dtype (float32 for 16-bit inputs, as LASP keeps its kv in
float32), one per query head: ``(B, Hq, D, D)`` (see Design, *Linear attention*) — under GQA that is
Hq/Hkv times the state a per-K/V-head design would send; the linear kernels take the same state.
Each rank keeps its q, k, v shards and the state it read (state_in: the received state, none on
rank 0 or where a chunk starts a document; non-causal the total) for backward, never the output.
``oracle/lasp2.py`` reuses the local work, the state gradients, the non-causal steps and the
records from here.

Mirrors ``sptutor/lasp.py`` step for step; here index ``t`` of each list is rank t.
"""

from __future__ import annotations

import torch

from sptutor import chunks, work
from sptutor.chain import Chain, check_documents, check_order
from sptutor.oracle.world import RankRecord, World, nbytes


def _macs(part, x, heads_q=None):
    """Useful multiply-adds of one piece of a rank's chunk; x: (B, C, H, D) one of its shards,
    heads_q the query heads the piece runs on (default: x's, for q or dout)."""
    batch, chunk, heads, head_dim = x.shape
    return work.linear_macs(part, batch, heads_q or heads, chunk, head_dim)


def _local_forward(world, q, k, v, decay, chain, needs_state):
    """Work that waits for nobody: intra-chunk outputs, segment by segment (no state crosses a
    document), and local states (the last segment's) where ``needs_state[t]``.

    Returns out: W x (B, C_t, Hq, D) and local_state: W x (B, Hq, D, D) or None (the plain C×C
    intra form).
    """
    out, local_state = [None] * world.size, [None] * world.size
    for rank in range(world.size):
        parts = chain.segments[rank]
        out[rank] = torch.cat(
            [chunks.intra(q[rank][:, p], k[rank][:, p], v[rank][:, p], decay) for p in parts], dim=1
        )
        world.compute(rank, sum(_macs("intra", q[rank][:, p]) for p in parts), "forward")
        if needs_state[rank]:
            last = chain.last(rank)
            local_state[rank] = chunks.local_state(
                k[rank][:, last], v[rank][:, last], decay, heads_q=q[rank].shape[2]
            )
            world.compute(rank, _macs("local_state", q[rank][:, last]), "forward")
    return out, local_state


def _local_backward(world, dout, q, k, v, state_in, decay, chain, needs_dstate):
    """Work that waits for nobody: intra-chunk gradients segment by segment, dq through the state
    read in forward, and the local dKV ``sum_i decay^(i+1) q_i^T dO_i`` where ``needs_dstate[t]``
    (i over the first segment if it read the state; zero if the chunk starts a document).

    Returns dq: W x (B, C_t, Hq, D), dk, dv: W x (B, C_t, Hkv, D), local_dstate: W x
    (B, Hq, D, D).
    """
    dq, dk, dv, local_dstate = ([None] * world.size for _ in range(4))
    for rank in range(world.size):
        parts, first = chain.segments[rank], chain.first(rank)
        grads = [
            chunks.intra_backward(dout[rank][:, p], q[rank][:, p], k[rank][:, p], v[rank][:, p],
                                  decay)
            for p in parts
        ]  # fmt: skip
        dq[rank], dk[rank], dv[rank] = (torch.cat([g[n] for g in grads], dim=1) for n in range(3))
        world.compute(rank, sum(_macs("intra_backward", q[rank][:, p]) for p in parts), "backward")
        if state_in[rank] is not None:  # the state read in forward is cached: no message needed
            dq[rank][:, first] += chunks.readout_backward(
                dout[rank][:, first], state_in[rank], decay
            )
            world.compute(rank, _macs("readout_backward", q[rank][:, first]), "backward")
        if needs_dstate[rank]:
            reader = first if chain.reads[rank] else slice(0, 0)  # a sum over no token is zero
            local_dstate[rank] = chunks.local_dstate(
                q[rank][:, reader], dout[rank][:, reader], decay
            )
            if chain.reads[rank]:
                world.compute(rank, _macs("local_dstate", q[rank][:, reader]), "backward")
    return dq, dk, dv, local_dstate


def _add_state_gradients(world, rank, dk, dv, dkv_out, k, v, decay, last, step):
    """dk, dv plus those of rank's local state (its last segment, ``last``), given dKV_out
    (None: no later chunk reads it)."""
    if dkv_out is None:
        return dk, dv
    dk_state, dv_state = chunks.local_state_backward(dkv_out, k[:, last], v[:, last], decay)
    world.compute(rank, _macs("local_state_backward", k[:, last], dkv_out.shape[1]), "backward",
                  step)  # fmt: skip
    dk[:, last] += dk_state
    dv[:, last] += dv_state
    return dk, dv


def _forward(world, q, k, v, decay, chain):
    """LASP, causal. q: W x (B, C_t, Hq, D); k, v: W x (B, C_t, Hkv, D); decay: (Hq,) or None;
    chain: where the state flows (``sptutor.chain.Chain``).

    Returns out: W x (B, C_t, Hq, D) (accumulation dtype) and state_in: W x (B, Hq, D, D) or None.
    """
    W = world.size
    # the last rank's state would go nowhere: it builds none
    out, local_state = _local_forward(world, q, k, v, decay, chain, [r < W - 1 for r in range(W)])
    # BEGIN SOLUTION lasp forward chain: receive KV_p0, pass KV_out on at once, then read KV_p0
    state_in = [None] * W
    for rank in range(W):  # the chain visits the chunks in sequence order
        kv_from_prev_rank = None
        if rank > 0:  # step rank-1: rank t waits for rank t-1
            kv_from_prev_rank = world.recv(rank - 1, rank)
        # state caching: kept for backward, never resent; a chunk that starts a document reads none
        state_in[rank] = kv_from_prev_rank if chain.reads[rank] else None
        if rank < W - 1:  # pass KV_out on first: the next rank waits for it, not for our output
            # KV_p0 flows on only through a chunk that is all one document, continued
            kv_through = state_in[rank] if chain.passes[rank] else None
            kv_out = chunks.carry(kv_through, local_state[rank], decay, chain.lengths[rank])
            world.send(kv_out, rank, rank + 1, phase="forward", step=rank)
        if state_in[rank] is not None:  # read by the tokens of the document that continues
            first = chain.first(rank)
            out[rank][:, first] += chunks.readout(q[rank][:, first], state_in[rank], decay)
            world.compute(rank, _macs("readout", q[rank][:, first]), "forward", step=rank)
    # END SOLUTION
    return out, state_in


def _backward(world, dout, q, k, v, state_in, decay, chain):
    """LASP, causal: the chain in reverse. dout like q; state_in as ``_forward`` returned it.

    Returns dq: W x (B, C_t, Hq, D), dk, dv: W x (B, C_t, Hkv, D) (accumulation dtype).
    """
    W = world.size
    # rank 0 read no state: it owes no dKV to anyone
    dq, dk, dv, local_dstate = _local_backward(
        world, dout, q, k, v, state_in, decay, chain, [rank > 0 for rank in range(W)]
    )
    # BEGIN SOLUTION lasp backward chain: receive dKV_out, send dKV_p0 back, add state gradients
    for rank in reversed(range(W)):  # the chain in reverse
        dkv_out = None  # the gradient of the KV this rank sent forward
        if rank < W - 1:  # step W-2-rank: rank t waits for rank t+1
            dkv_from_next_rank = world.recv(rank + 1, rank)
            # none if the next chunk starts a document: it never read our KV
            dkv_out = dkv_from_next_rank if chain.reads[rank + 1] else None
        if rank > 0:  # pass dKV_p0 back first: the previous rank waits for it
            # dKV_out flows on only through a chunk of one continued document (local_dstate is
            # zero where the chunk starts a document: then nothing flows back)
            dkv_through = dkv_out if chain.passes[rank] else None
            dkv_in = chunks.carry(dkv_through, local_dstate[rank], decay, chain.lengths[rank])
            world.send(dkv_in, rank, rank - 1, phase="backward", step=W - 1 - rank)
        dk[rank], dv[rank] = _add_state_gradients(
            world, rank, dk[rank], dv[rank], dkv_out, k[rank], v[rank], decay, chain.last(rank),
            W - 1 - rank,
        )  # fmt: skip
    # END SOLUTION
    return dq, dk, dv


def _all_reduce(world, state, phase):
    """LASP's non-causal sum of every rank's state: one all-reduce."""
    return world.all_reduce(state, phase=phase)


def _forward_noncausal(world, q, k, v, sum_over_ranks):
    """Non-causal: ``KV_total = sum_t K_t^T V_t`` (``sum_over_ranks``: LASP's all-reduce, or
    LASP-2's all-gather and sum), read as ``q·KV_total``. Returns out and state_in = KV_total."""
    W = world.size
    local_state, out = [None] * W, [None] * W
    for rank in range(W):
        local_state[rank] = chunks.local_state(k[rank], v[rank], None, heads_q=q[rank].shape[2])
        world.compute(rank, _macs("local_state", q[rank]), "forward")
    total = sum_over_ranks(world, local_state, "forward")
    for rank in range(W):
        out[rank] = chunks.readout(q[rank], total[rank], None)
        world.compute(rank, _macs("readout", q[rank]), "forward")
    return out, total


def _backward_noncausal(world, dout, q, k, v, total, sum_over_ranks):
    """``dq = dO KV_total^T``; ``dKV_total = sum_t Q_t^T dO_t`` (summed like the forward);
    ``dk = V dKV_total^T``, ``dv = K dKV_total``."""
    W = world.size
    dq, dk, dv, local_dstate = ([None] * W for _ in range(4))
    for rank in range(W):
        dq[rank] = chunks.readout_backward(dout[rank], total[rank], None)
        local_dstate[rank] = chunks.local_dstate(q[rank], dout[rank], None)
        macs = _macs("readout_backward", q[rank]) + _macs("local_dstate", q[rank])
        world.compute(rank, macs, "backward")
    dtotal = sum_over_ranks(world, local_dstate, "backward")
    for rank in range(W):
        dk[rank], dv[rank] = chunks.local_state_backward(dtotal[rank], k[rank], v[rank], None)
        world.compute(rank, _macs("local_state_backward", q[rank]), "backward")
    return dq, dk, dv


def _saved_bytes(q, k, v, state):
    """What a rank keeps for backward: its q, k, v shards and the state it read (if any)."""
    return sum(map(nbytes, (q, k, v))) + (0 if state is None else nbytes(state))


def _records(q, k, v, out, state_in):
    """One RankRecord per rank: out in the inputs' dtype, state_in and the bytes it keeps."""
    return [
        RankRecord(out=o.to(qr.dtype), state_in=state, saved_bytes=_saved_bytes(qr, kr, vr, state))
        for qr, kr, vr, o, state in zip(q, k, v, out, state_in)
    ]


def _record_grads(records, dq, dk, dv):
    """Each rank's dq, dk, dv, cast to the dtype of its output (the inputs')."""
    for record, dq_rank, dk_rank, dv_rank in zip(records, dq, dk, dv):
        dtype = record.out.dtype
        record.dq, record.dk, record.dv = dq_rank.to(dtype), dk_rank.to(dtype), dv_rank.to(dtype)


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, decay: torch.Tensor | None
) -> list[RankRecord]:
    """Run LASP on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, C_t, Hq, D); k, v: W x (B, C_t, Hkv, D); dout: like q, or None (forward only);
    positions: W x (C_t,), contiguous (rank t owns chunk t); documents: W x (C_t,) document ids,
    or W x None (one document; documents need ``causal``); decay: (Hq,) or None (causal only).
    Causal: a chain of W-1 sends of KV (B, Hq, D, D) forward and W-1 of dKV backward.
    Non-causal: one all-reduce of K^T V forward, one of Q^T dO backward. ``state_in``: the
    received KV_p0 if the chunk reads it (None on rank 0 and where a chunk starts a document),
    or KV_total non-causal; saved: q, k, v and state_in.
    """
    check_order(positions)
    check_documents("lasp", causal, documents[0] is not None)
    chain = Chain.of(positions, documents)
    if causal:
        out, state_in = _forward(world, q, k, v, decay, chain)
    else:
        out, state_in = _forward_noncausal(world, q, k, v, _all_reduce)
    records = _records(q, k, v, out, state_in)
    if dout is not None:
        if causal:
            grads = _backward(world, dout, q, k, v, state_in, decay, chain)
        else:
            grads = _backward_noncausal(world, dout, q, k, v, state_in, _all_reduce)
        _record_grads(records, *grads)
    return records
