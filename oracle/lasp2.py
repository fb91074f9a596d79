"""LASP-2, emulated: linear attention whose only messages are D×D states, gathered.

Rank t holds chunk t of the sequence (contiguous layout; C_t tokens, which may differ by one).
Every rank does the same local work as LASP (``oracle/lasp.py``: the intra-chunk output and its
chunk's local state), then, causal, one all-gather of the local states replaces LASP's chain:
rank t combines those of the ranks before it, a prefix
``KV_p0 = sum_{t'<t} decay^(C_{t'+1} + ... + C_{t-1}) local_t'`` (the chain, done locally), and
reads ``decay^(i+1) q_i KV_p0``. Backward: one all-gather of the local dKV, combined over the
ranks after it (a suffix). Non-causal: LASP's steps, with the sum of every rank's ``K^T V`` (and
backward of ``Q^T dO``) made by an all-gather and a local sum.

Packed documents (causal only, ``sptutor.chain``): the prefix stops at the most recent document
start — a rank whose chunk starts a document after its first token contributes its last
segment's state and cuts everything before it, and one whose chunk starts at a document start
cuts it too — and a chunk that starts a document reads nothing. The suffix stops the same way.

States travel in the accumulation dtype (float32 for 16-bit inputs), one per query head:
``(B, Hq, D, D)`` (see Design, *Linear attention*). Each rank keeps its q, k, v shards and the
state it read (state_in: the prefix state, none on rank 0 or where a chunk starts a document;
non-causal the total) for backward, never the output.

Mirrors ``sptutor/lasp2.py`` step for step; here index ``t`` of each list is rank t.
"""

from __future__ import annotations

import torch

from sptutor import chunks
from sptutor.chain import Chain, check_documents, check_order
from sptutor.oracle import lasp
from sptutor.oracle.world import RankRecord, World


def _forward(world, q, k, v, decay, chain):
    """LASP-2, causal. q: W x (B, C_t, Hq, D); k, v: W x (B, C_t, Hkv, D); decay: (Hq,) or None;
    chain: where the state flows (``sptutor.chain.Chain``).

    Returns out: W x (B, C_t, Hq, D) (accumulation dtype) and state_in: W x the prefix KV_p0
    (B, Hq, D, D), or None where a chunk reads no state.
    """
    W = world.size
    # BEGIN SOLUTION lasp2 forward: all-gather the local states, sum the decayed prefix, read it
    # every rank contributes a state (the all-gather is symmetric), though no one reads the last
    out, local_state = lasp._local_forward(world, q, k, v, decay, chain, [True] * W)
    # LASP-2 overlaps this all-gather with the intra output; ours computes that first, then blocks
    gathered = world.all_gather(local_state, phase="forward")  # W x (W, B, Hq, D, D)
    state_in = [None] * W
    for rank in range(W):
        # KV_p0 = sum over the earlier ranks t' back to the last document start of
        # decay^(C_{t'+1} + ... + C_{rank-1}) local_t'
        before = chain.before(rank)
        state_in[rank] = chunks.decayed_sum(gathered[rank][before], decay, chain.lengths[before])
        if state_in[rank] is not None:  # read by the tokens of the document that continues
            first = chain.first(rank)
            out[rank][:, first] += chunks.readout(q[rank][:, first], state_in[rank], decay)
            world.compute(rank, lasp._macs("readout", q[rank][:, first]), "forward")
    # END SOLUTION
    return out, state_in


def _backward(world, dout, q, k, v, state_in, decay, chain):
    """LASP-2, causal: one all-gather of the local dKV, then a suffix on every rank.

    dout like q; state_in as ``_forward`` returned it. Returns dq: W x (B, C_t, Hq, D), dk, dv:
    W x (B, C_t, Hkv, D) (accumulation dtype).
    """
    W = world.size
    # BEGIN SOLUTION lasp2 backward: all-gather the local dKV, sum the decayed suffix, add its grads
    # every rank contributes a dKV (the all-gather is symmetric), though no one reads rank 0's
    dq, dk, dv, local_dstate = lasp._local_backward(
        world, dout, q, k, v, state_in, decay, chain, [True] * W
    )
    gathered = world.all_gather(local_dstate, phase="backward")  # W x (W, B, Hq, D, D)
    for rank in range(W):
        # dKV_out = sum over the later ranks t' up to the next document start of
        # decay^(C_{rank+1} + ... + C_{t'-1}) local_dKV_t'
        after = chain.after(rank)
        dkv_out = chunks.decayed_sum(
            reversed(gathered[rank][after]), decay, reversed(chain.lengths[after])
        )
        dk[rank], dv[rank] = lasp._add_state_gradients(
            world, rank, dk[rank], dv[rank], dkv_out, k[rank], v[rank], decay, chain.last(rank), 0
        )
    # END SOLUTION
    return dq, dk, dv


def _all_gather_and_sum(world, state, phase):
    """LASP-2's non-causal sum of every rank's state: one all-gather, then a local sum."""
    return [sum(gathered) for gathered in world.all_gather(state, phase=phase)]


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, decay: torch.Tensor | None
) -> list[RankRecord]:
    """Run LASP-2 on the emulated ``world``; arguments and records as in
    :func:`sptutor.oracle.lasp.emulate`.

    One all-gather of the local states (B, Hq, D, D) forward and one of the local dKV backward,
    causal or not; ``state_in`` is the prefix KV_p0 each rank combined (None where a chunk
    reads no state: rank 0, or a chunk that starts a document), or KV_total non-causal; saved:
    q, k, v and state_in.
    """
    check_order(positions)
    check_documents("lasp2", causal, documents[0] is not None)
    chain = Chain.of(positions, documents)
    if causal:
        out, state_in = _forward(world, q, k, v, decay, chain)
    else:
        out, state_in = lasp._forward_noncausal(world, q, k, v, _all_gather_and_sum)
    records = lasp._records(q, k, v, out, state_in)
    if dout is not None:
        if causal:
            grads = _backward(world, dout, q, k, v, state_in, decay, chain)
        else:
            grads = lasp._backward_noncausal(world, dout, q, k, v, state_in, _all_gather_and_sum)
        lasp._record_grads(records, *grads)
    return records
