"""A small ring attention and a small Ulysses written on plain torch.distributed, as another
library would write them, each with switches that plant one well-known mistake; the checker's
tests must pass the correct variants and name each mistake."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


class _RingPass(torch.autograd.Function):
    """Send x to rank+shift, receive from rank-shift; the gradient travels back."""

    @staticmethod
    def forward(ctx, x, group, shift):
        ctx.group, ctx.shift = group, shift
        return _exchange(x, group, shift)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.group, -ctx.shift), None, None


def _exchange(x, group, shift):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    received = torch.empty_like(x, memory_format=torch.contiguous_format)
    peer_to = dist.get_global_rank(group, (rank + shift) % world)
    peer_from = dist.get_global_rank(group, (rank - shift) % world)
    ops = [dist.P2POp(dist.isend, x.contiguous(), peer_to, group),
           dist.P2POp(dist.irecv, received, peer_from, group)]  # fmt: skip
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Swap(torch.autograd.Function):
    """Identity on (k, v) whose backward returns the gradients swapped or summed."""

    @staticmethod
    def forward(ctx, k, v, how):
        ctx.how = how
        return k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dk, dv):
        if ctx.how == "swap":
            return dv, dk, None
        return dk + dv, dv, None


def ring(q, k, v, *, causal=False, group=None, bug=None, cu_seqlens=None):
    """Ring attention on contiguous (B, S/W, H, D) shards, differentiable through autograd;
    ``cu_seqlens`` (N+1,) global offsets of packed documents, or None.
    ``bug``: None, "no-rescale", "wrong-peer", "diagonal", "swap-dkdv", "sum-dkdv",
    "zero-lse", "no-grad", "no-documents" (cu_seqlens taken and not used), "local-documents"
    (documents looked up by each token's index in its shard)."""
    if bug in ("swap-dkdv", "sum-dkdv"):
        k, v = _Swap.apply(k, v, "swap" if bug == "swap-dkdv" else "sum")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _, local, heads, dim = q.shape
    groups = heads // k.shape[2]
    scale = 1 / math.sqrt(dim)
    q_pos = torch.arange(rank * local, (rank + 1) * local)
    out, lse = None, None
    shift = -1 if bug == "wrong-peer" else 1
    for step in range(world):
        src = (rank - step) % world  # whose block we hold
        k_pos = torch.arange(src * local, (src + 1) * local)
        kk, vv = (x.repeat_interleave(groups, dim=2) for x in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
        if causal:
            visible = q_pos[:, None] > k_pos if bug == "diagonal" else q_pos[:, None] >= k_pos
            scores = scores.masked_fill(~visible, float("-inf"))
        if cu_seqlens is not None and bug != "no-documents":
            # local-documents: looked up by the index in the shard, not the global position
            looked_up = [p - p[0] if bug == "local-documents" else p for p in (q_pos, k_pos)]
            q_doc, k_doc = (torch.searchsorted(cu_seqlens, p, right=True) for p in looked_up)
            scores = scores.masked_fill(q_doc[:, None] != k_doc, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)  # (B, H, S/W)
        weights = torch.exp(scores - block_lse[..., None]).nan_to_num(0.0)
        block_out = torch.einsum("bhqk,bkhd->bqhd", weights, vv)
        if out is None:
            out, lse = block_out, block_lse
        elif bug == "no-rescale":
            out, lse = block_out, torch.logaddexp(lse, block_lse)
        else:
            new_lse = torch.logaddexp(lse, block_lse)
            old_w = torch.exp(lse - new_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
            new_w = torch.exp(block_lse - new_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
            out, lse = out * old_w + block_out * new_w, new_lse
        if step < world - 1:
            k, v = _RingPass.apply(k, group, shift), _RingPass.apply(v, group, shift)
    if bug == "zero-lse":
        lse = torch.zeros_like(lse)
    if bug == "no-grad":
        out = out.detach()
    return out, lse


def ring_with_document_ids(q, k, v, *, causal=False, group=None, document_ids=None):
    """The same ring for a library that takes per-token document ids (segment ids, (S/W,)):
    it all-gathers them (contiguous even shards: rank order is sequence order) and rebuilds the
    global offsets from the ids' counts."""
    cu_seqlens = None
    if document_ids is not None:
        gathered = [torch.empty_like(document_ids) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, document_ids, group=group)
        counts = torch.bincount(torch.cat(gathered))
        cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ring(q, k, v, causal=causal, group=group, cu_seqlens=cu_seqlens)


def ring_bhsd(q, k, v, *, causal=False, group=None):
    """The same ring on (B, H, S/W, D) tensors, returning out only."""
    out, _ = ring(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal, group=group)
    return out.transpose(1, 2)


def ring_forward_only(q, k, v, causal, group):
    """An inference library's ring: positional keywords, no autograd."""
    with torch.no_grad():
        return ring(q, k, v, causal=causal, group=group)[0]


def ulysses(q, k, v, *, is_causal=False, group=None, bug=None):
    """Ulysses on contiguous (B, S/W, H, D) shards: all-to-all heads <-> sequence, full
    attention on H/W heads, all-to-all back. ``bug``: None or "split" (chunks reversed)."""
    world = dist.get_world_size(group)
    heads_kv = k.shape[2]
    if heads_kv % world:
        k, v = (x.repeat_interleave(q.shape[2] // heads_kv, dim=2) for x in (k, v))

    def to_heads(x):  # (B, S/W, H, D) -> (B, S, H/W, D)
        chunks = list(x.chunk(world, dim=2))
        if bug == "split":
            chunks = chunks[::-1]
        received = dist_nn.all_to_all([torch.empty_like(c) for c in chunks],
                                      [c.contiguous() for c in chunks], group=group)  # fmt: skip
        return torch.cat(received, dim=1)

    def to_sequence(x):  # (B, S, H/W, D) -> (B, S/W, H, D)
        chunks = list(x.chunk(world, dim=1))
        received = dist_nn.all_to_all([torch.empty_like(c) for c in chunks],
                                      [c.contiguous() for c in chunks], group=group)  # fmt: skip
        return torch.cat(received, dim=2)

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    kh, vh = (x.repeat_interleave(qh.shape[2] // kh.shape[2], dim=2) for x in (kh, vh))
    out = torch.nn.functional.scaled_dot_product_attention(
        qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), is_causal=is_causal
    ).transpose(1, 2)
    return to_sequence(out)
