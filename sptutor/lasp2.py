"""LASP-2 on ``torch.distributed``: linear attention whose only messages are D×D states, gathered.

This process is rank t of the group and holds chunk t of the sequence (C_t tokens, S/W or one
more or fewer; contiguous layout). It does the same local work as LASP (``sptutor/lasp.py``: the
intra-chunk output and its chunk's local state), then, causal, one all-gather of the local
states replaces LASP's chain: rank t combines those of the ranks before it, a prefix
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
state it read (state_in: the prefix state, none on rank 0 or where its chunk starts a document;
non-causal the total) for backward, never the output.

Mirrors ``oracle/lasp2.py`` step for step; here each process is one rank.
"""

from __future__ import annotations

import torch

from sptutor import chunks, comm, lasp


def _forward(q, k, v, decay, chain, group, backend):
    """LASP-2, causal. q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None; chain: where
    the state flows (``sptutor.chain.Chain``, every rank's).

    Returns out: (B, C, Hq, D) (accumulation dtype) and state_in: the prefix KV_p0
    (B, Hq, D, D), or None where this chunk reads no state.
    """
    rank, _ = comm.rank_and_size(group)
    # BEGIN SOLUTION lasp2 forward: all-gather the local states, sum the decayed prefix, read it
    # every rank contributes a state (the all-gather is symmetric), though no one reads the last
    out, local_state = lasp._local_forward(q, k, v, decay, chain, rank, True, backend)
    # LASP-2 overlaps this all-gather with the intra output; ours computes that first, then blocks
    gathered = comm.all_gather(local_state, group, phase="forward")  # (W, B, Hq, D, D)
    # KV_p0 = sum over the earlier ranks t' back to the last document start of
    # decay^(C_{t'+1} + ... + C_{rank-1}) local_t'
    before = chain.before(rank)
    state_in = chunks.decayed_sum(gathered[before], decay, chain.lengths[before])
    if state_in is not None:  # read by the tokens of the document that continues
        first = chain.first(rank)
        out[:, first] += chunks.readout(q[:, first], state_in, decay)
    # END SOLUTION
    return out, state_in


def _backward(dout, q, k, v, state_in, decay, chain, group, backend):
    """LASP-2, causal: one all-gather of the local dKV, then a suffix on this rank.

    dout like q; state_in as ``_forward`` returned it. Returns dq: (B, C, Hq, D), dk, dv:
    (B, C, Hkv, D) (accumulation dtype).
    """
    rank, _ = comm.rank_and_size(group)
    # BEGIN SOLUTION lasp2 backward: all-gather the local dKV, sum the decayed suffix, add its grads
    # every rank contributes a dKV (the all-gather is symmetric), though no one reads rank 0's
    dq, dk, dv, local_dstate = lasp._local_backward(
        dout, q, k, v, state_in, decay, chain, rank, True, backend
    )
    gathered = comm.all_gather(local_dstate, group, phase="backward")  # (W, B, Hq, D, D)
    # dKV_out = sum over the later ranks t' up to the next document start of
    # decay^(C_{rank+1} + ... + C_{t'-1}) local_dKV_t'
    after = chain.after(rank)
    dkv_out = chunks.decayed_sum(reversed(gathered[after]), decay, reversed(chain.lengths[after]))
    dk, dv = lasp._add_state_gradients(dk, dv, dkv_out, k, v, decay, chain.last(rank))
    # END SOLUTION
    return dq, dk, dv


def _all_gather_and_sum(state, group, phase):
    """LASP-2's non-causal sum of every rank's state: one all-gather, then a local sum."""
    return sum(comm.all_gather(state, group, phase=phase))


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, decay, chain, group, backend):
        if causal:
            out, state_in = _forward(q, k, v, decay, chain, group, backend)
        else:
            out, state_in = lasp._forward_noncausal(q, k, v, group, _all_gather_and_sum)
        ctx.save_for_backward(q, k, v, state_in)  # the state read, never the output
        ctx.options = (causal, decay, chain, group, backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, state_in = ctx.saved_tensors
        causal, decay, chain, group, backend = ctx.options
        dout = dout.contiguous()
        if causal:
            dq, dk, dv = _backward(dout, q, k, v, state_in, decay, chain, group, backend)
        else:
            dq, dk, dv = lasp._backward_noncausal(
                dout, q, k, v, state_in, group, _all_gather_and_sum
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def lasp2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    decay: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """LASP-2 (Sun et al. 2025) on (B, C, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards; arguments as in
    :func:`sptutor.lasp.lasp_attention` (``seq_len=S`` when W does not divide S; ``cu_seqlens``
    for packed documents, causal only).

    One all-gather of the local states (B, Hq, D, D) forward and one of the local dKV backward,
    causal or not. Returns out: (B, C, Hq, D) this rank's output (differentiable).
    """
    backend, chain = lasp._prepare(
        "lasp2", q, k, v, causal, decay, group, backend, seq_len, cu_seqlens
    )
    return _Lasp2.apply(q, k, v, causal, decay, chain, group, backend)
