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

Uneven shards: [K‖V] and the shares of [dK‖dV] are padded to the largest shard, L = ceil(S/W),
for the collectives, and each block's padding dropped after (``sptutor.padding``); packed
documents mask blocks as positions do (see ``oracle/lss.py``).

Saved for backward: q, out, lse and the gathered K, V of all W blocks (W·L tokens).
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm, padding
from sptutor.checks import check_qkv


def _forward(q, k, v, positions, documents, visible, causal, scale, group, backend):
    """q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); positions: W x (S_i,), every group rank's;
    documents: W x (S_i,) document ids, or W x None; visible: W bools, whether this rank's
    queries see any key of rank i's block (decided on the host).

    Returns out: (B, S_r, Hq, D) in q's dtype, lse: (B, Hq, S_r) in the accumulation dtype, and
    kv_gathered: (W, 2, B, L, Hkv, D) (kept for backward), L = max S_i.
    """
    rank, _ = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    sizes = [len(p) for p in positions]
    # BEGIN SOLUTION lss forward: one all-gather of [K‖V], attend to every block, merge by LSE
    # K and V stacked into one tensor, so that one collective moves both; padded to L tokens
    fused = padding.pad(torch.stack((k, v)), max(sizes), dim=2)  # (2, B, L, Hkv, D)
    # kept as gathered: the buffer the collective filled is the one saved for backward
    kv_gathered = comm.all_gather(fused, group, phase="forward")  # (W, 2, B, L, Hkv, D)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                     device=q.device)  # fmt: skip
    mine = (positions[rank], documents[rank])
    # kv_gathered[src] is rank src's [K‖V] as this rank received it
    for src, kv in enumerate(kv_gathered):
        theirs = (positions[src], documents[src])
        if not visible[src]:
            continue  # fully masked (by positions or documents): nothing to compute
        k_block, v_block = padding.unpad(kv, sizes[src], dim=2)  # the padding dropped
        block_out, block_lse = backends.attention_forward(
            backend, q, k_block, v_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
        )
        # merge partial outputs by their LSE (online softmax)
        out, lse = blocks.merge(out, lse, block_out, block_lse)
    # END SOLUTION
    return out.to(q.dtype), lse, kv_gathered


def _backward(dout, q, kv_gathered, out, lse, positions, documents, visible, causal, scale, group,
              backend):  # fmt: skip
    """dout, out: (B, S_r, Hq, D); lse: (B, Hq, S_r); kv_gathered as ``_forward`` kept it;
    positions, documents, visible as there.

    Returns dq: (B, S_r, Hq, D) and dk, dv: (B, S_r, Hkv, D), in q's dtype.
    """
    rank, _ = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    sizes = [len(p) for p in positions]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # BEGIN SOLUTION lss backward: every block's gradients, one reduce-scatter of [dK‖dV]
    # dkv_shares[src]: this rank's share of src's [dK‖dV], (2, B, L, Hkv, D); 0 if masked
    dkv_shares = [torch.zeros(kv.shape, dtype=acc, device=kv.device) for kv in kv_gathered]
    mine = (positions[rank], documents[rank])
    for src, kv in enumerate(kv_gathered):
        theirs = (positions[src], documents[src])
        if not visible[src]:
            continue
        k_block, v_block = padding.unpad(kv, sizes[src], dim=2)
        block_dq, block_dk, block_dv = backends.attention_backward(
            backend, dout, q, k_block, v_block, out, lse,
            mine[0], theirs[0], causal, scale, mine[1], theirs[1],
        )  # fmt: skip
        dq += block_dq
        share = torch.stack((block_dk, block_dv))  # (2, B, S_src, Hkv, D)
        dkv_shares[src] = padding.pad(share, max(sizes), dim=2)
    # one fused reduce-scatter: the owner of each block receives the sum of every rank's share
    dkv = comm.reduce_scatter(dkv_shares, group, phase="backward")  # (2, B, L, Hkv, D)
    dkv = padding.unpad(dkv, sizes[rank], dim=2)  # (2, B, S_r, Hkv, D)
    # END SOLUTION
    dtype = q.dtype
    return dq.to(dtype), dkv[0].to(dtype), dkv[1].to(dtype)


class _LSSAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, visible, causal, scale, group, backend):
        out, lse, kv_gathered = _forward(
            q, k, v, positions, documents, visible, causal, scale, group, backend
        )
        ctx.save_for_backward(q, out, lse, kv_gathered)
        ctx.options = (positions, documents, visible, causal, scale, group, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, out, lse, kv_gathered = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, kv_gathered, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None


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
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """LSS attention (our reading) on (B, S_r, H, D) shards, sequence before heads.

    Call on every rank of ``group`` with its own shards.

    Shards, ``seq_len`` (the global S, needed when W does not divide it), ``cu_seqlens``
    (packed documents' global offsets) and the result are as :func:`sptutor.ring.ring_attention`'s:
    q: (B, S_r, Hq, D), k, v: (B, S_r, Hkv, D) this rank's shards; out: (B, S_r, Hq, D)
    (differentiable), with ``return_lse`` also lse: (B, Hq, S_r) (detached).
    """
    check_qkv(q, k, v)
    positions, documents, visible, backend, scale = backends.prepare(
        "lss", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse, seq_len=seq_len, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    rank = comm.rank_and_size(group)[0]
    out, lse = _LSSAttention.apply(
        q, k, v, positions, documents, visible[rank], causal, scale, group, backend
    )
    return (out, lse) if return_lse else out
