"""LSS Transformer (Wang et al. 2023) on ``torch.distributed``: a fused all-gather, then a fused
reduce-scatter.

This is **our reading of the paper's abstract** (see Design, *What sptutor is*); ``oracle/lss.py``
says what we read and what could not be checked. Mirrors ``oracle/lss.py`` step for step (same step
names, same order of messages); here each process is one rank.

Forward: one all-gather of the fused ``[K‖V]`` shard, kept for backward (O(S) memory per rank);
then this rank's queries against each of the W gathered blocks, merged by log-sum-exp (online
softmax), fully masked blocks skipped. The output stays local: nothing is aggregated.
Backward: local gradients of every gathered block (FlashAttention-2 form, final out and LSE);
dq stays here, and one reduce-scatter of the fused ``[dK‖dV]`` (accumulation dtype) delivers to
each rank the sum of every rank's share of its own keys.

Saved for backward: q, out, lse and the gathered K, V of all W blocks.
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm
from sptutor.checks import check_qkv


def _forward(q, k, v, positions, causal, scale, group, backend):
    """q: (B, S/W, Hq, D); k, v: (B, S/W, Hkv, D); positions: W x (S/W,), every group rank's.

    Returns out: (B, S/W, Hq, D) in q's dtype, lse: (B, Hq, S/W) in the accumulation dtype, and
    kv_gathered: (W, 2, B, S/W, Hkv, D) (kept for backward).
    """
    rank, _ = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    batch, seq_local, heads_q, _ = q.shape
    # BEGIN SOLUTION lss forward: one all-gather of [K‖V], attend to every block, merge by LSE
    # K and V stacked into one tensor, so that one collective moves both
    fused = torch.stack((k, v))  # (2, B, S/W, Hkv, D)
    # kept as gathered: the buffer the collective filled is the one saved for backward
    kv_gathered = comm.all_gather(fused, group, phase="forward")  # (W, 2, B, S/W, Hkv, D)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads_q, seq_local), float("-inf"), dtype=acc, device=q.device)
    # kv_gathered[src] is rank src's [K‖V] as this rank received it
    for src, (k_block, v_block) in enumerate(kv_gathered):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue  # fully masked by positions: nothing to compute
        block_out, block_lse = backends.attention_forward(
            backend, q, k_block, v_block, positions[rank], positions[src], causal, scale
        )
        # merge partial outputs by their LSE (online softmax)
        out, lse = blocks.merge(out, lse, block_out, block_lse)
    # END SOLUTION
    return out.to(q.dtype), lse, kv_gathered


def _backward(dout, q, kv_gathered, out, lse, positions, causal, scale, group, backend):
    """dout, out: (B, S/W, Hq, D); lse: (B, Hq, S/W); kv_gathered as ``_forward`` kept it.

    Returns dq: (B, S/W, Hq, D) and dk, dv: (B, S/W, Hkv, D), in q's dtype.
    """
    rank, _ = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # BEGIN SOLUTION lss backward: every block's gradients, one reduce-scatter of [dK‖dV]
    # dkv_shares[src]: this rank's share of src's [dK‖dV], (2, B, S/W, Hkv, D); 0 if masked
    dkv_shares = [torch.zeros(kv.shape, dtype=acc, device=kv.device) for kv in kv_gathered]
    for src, (k_block, v_block) in enumerate(kv_gathered):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue
        block_dq, block_dk, block_dv = backends.attention_backward(
            backend, dout, q, k_block, v_block, out, lse,
            positions[rank], positions[src], causal, scale,
        )  # fmt: skip
        dq += block_dq
        dkv_shares[src] = torch.stack((block_dk, block_dv))
    # one fused reduce-scatter: the owner of each block receives the sum of every rank's share
    dkv = comm.reduce_scatter(dkv_shares, group, phase="backward")  # (2, B, S/W, Hkv, D)
    # END SOLUTION
    dtype = q.dtype
    return dq.to(dtype), dkv[0].to(dtype), dkv[1].to(dtype)


class _LSSAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, causal, scale, group, backend):
        out, lse, kv_gathered = _forward(q, k, v, positions, causal, scale, group, backend)
        ctx.save_for_backward(q, out, lse, kv_gathered)
        ctx.options = (positions, causal, scale, group, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, out, lse, kv_gathered = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, kv_gathered, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def lss_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: str = "contiguous",
    group=None,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
):
    """LSS attention (our reading) on (B, S/W, H, D) shards, sequence before heads.

    Call on every rank of ``group`` with its own shards.

    q: (B, S/W, Hq, D) this rank's queries; k, v: (B, S/W, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them.
    Returns out: (B, S/W, Hq, D) this rank's output (differentiable), and with ``return_lse`` also
    lse: (B, Hq, S/W) (detached, float32; float64 for float64 inputs).
    """
    check_qkv(q, k, v)
    positions, _documents, backend, scale = backends.prepare(
        "lss", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse,
    )  # fmt: skip
    out, lse = _LSSAttention.apply(q, k, v, positions, causal, scale, group, backend)
    return (out, lse) if return_lse else out
