"""LASP-2 on ``torch.distributed``: linear attention whose only messages are D×D states, gathered.

This process is rank t of the group and holds chunk t of the sequence (C = S/W tokens; contiguous
layout). It does the same local work as LASP (``sptutor/lasp.py``: the intra-chunk output and its
chunk's local state), then, causal, one all-gather of the local states replaces LASP's chain: rank
t combines those of the ranks before it, a prefix ``KV_p0 = sum_{t'<t} decay^(C(t-1-t')) local_t'``
(the chain, done locally), and reads ``decay^(i+1) q_i KV_p0``. Backward: one all-gather of the
local dKV, combined over the ranks after it (a suffix). Non-causal: LASP's steps, with the sum of
every rank's ``K^T V`` (and backward of ``Q^T dO``) made by an all-gather and a local sum.

States travel in the accumulation dtype (float32 for 16-bit inputs), one per query head:
``(B, Hq, D, D)`` (see Design, *Linear attention*). Each rank keeps its q, k, v shards and the
state it read (state_in: the prefix state, none on rank 0; non-causal the total) for backward,
never the output.

Mirrors ``oracle/lasp2.py`` step for step; here each process is one rank.
"""

from __future__ import annotations

import torch

from sptutor import chunks, comm, lasp


def _forward(q, k, v, decay, group, backend):
    """LASP-2, causal. q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None.

    Returns out: (B, C, Hq, D) (accumulation dtype) and state_in: the prefix KV_p0
    (B, Hq, D, D), or None on rank 0.
    """
    rank, _ = comm.rank_and_size(group)
    chunk = q.shape[1]
    # BEGIN SOLUTION lasp2 forward: all-gather the local states, sum the decayed prefix, read it
    # every rank contributes a state (the all-gather is symmetric), though no one reads the last
    out, local_state = lasp._local_forward(q, k, v, decay, True, backend)
    # LASP-2 overlaps this all-gather with the intra output; ours computes that first, then blocks
    gathered = comm.all_gather(local_state, group, phase="forward")  # (W, B, Hq, D, D)
    # KV_p0 = sum over earlier ranks t' of decay^(C·(rank-1-t')) local_t'
    state_in = chunks.decayed_sum(gathered[:rank], decay, chunk)
    if state_in is not None:
        out = out + chunks.readout(q, state_in, decay)
    # END SOLUTION
    return out, state_in


def _backward(dout, q, k, v, state_in, decay, group, backend):
    """LASP-2, causal: one all-gather of the local dKV, then a suffix on this rank.

    dout like q; state_in as ``_forward`` returned it. Returns dq: (B, C, Hq, D), dk, dv:
    (B, C, Hkv, D) (accumulation dtype).
    """
    rank, _ = comm.rank_and_size(group)
    chunk = q.shape[1]
    # BEGIN SOLUTION lasp2 backward: all-gather the local dKV, sum the decayed suffix, add its grads
    # every rank contributes a dKV (the all-gather is symmetric), though no one reads rank 0's
    dq, dk, dv, local_dstate = lasp._local_backward(dout, q, k, v, state_in, decay, True, backend)
    gathered = comm.all_gather(local_dstate, group, phase="backward")  # (W, B, Hq, D, D)
    # dKV_out = sum over later ranks t' of decay^(C·(t'-rank-1)) local_dKV_t'
    dkv_out = chunks.decayed_sum(reversed(gathered[rank + 1 :]), decay, chunk)
    dk, dv = lasp._add_state_gradients(dk, dv, dkv_out, k, v, decay)
    # END SOLUTION
    return dq, dk, dv


def _all_gather_and_sum(state, group, phase):
    """LASP-2's non-causal sum of every rank's state: one all-gather, then a local sum."""
    return sum(comm.all_gather(state, group, phase=phase))


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, decay, group, backend):
        if causal:
            out, state_in = _forward(q, k, v, decay, group, backend)
        else:
            out, state_in = lasp._forward_noncausal(q, k, v, group, _all_gather_and_sum)
        ctx.save_for_backward(q, k, v, state_in)  # the state read, never the output
        ctx.options = (causal, decay, group, backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, state_in = ctx.saved_tensors
        causal, decay, group, backend = ctx.options
        dout = dout.contiguous()
        if causal:
            dq, dk, dv = _backward(dout, q, k, v, state_in, decay, group, backend)
        else:
            dq, dk, dv = lasp._backward_noncausal(
                dout, q, k, v, state_in, group, _all_gather_and_sum
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def lasp2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    decay: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """LASP-2 (Sun et al. 2025) on (B, C, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards; arguments as in
    :func:`sptutor.lasp.lasp_attention`.

    One all-gather of the local states (B, Hq, D, D) forward and one of the local dKV backward,
    causal or not. Returns out: (B, C, Hq, D) this rank's output (differentiable).
    """
    backend = lasp._prepare("lasp2", q, k, v, causal, decay, group, backend)
    return _Lasp2.apply(q, k, v, causal, decay, group, backend)
