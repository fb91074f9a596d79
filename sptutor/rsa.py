"""Ring Self-Attention (RSA, Li et al. 2021) on ``torch.distributed``: full score rows, then rings
of K and V.

Mirrors ``oracle/rsa.py`` step for step (same step names, same order of messages); here each
process is one rank, and each ring hop is started before this block's compute so the two overlap.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): this rank fills its full score rows ``S^r: (B, Hq, S/W, S)`` block
   by block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions.
2. Softmax over the whole row, no online softmax: ``P = exp(S - lse)``.
3. Ring of values (W-1 hops): ``out = sum_src P[:, :, block(src)]·v_src`` (paper eq. 4).

Backward, the paper's code (``RingAV.backward`` then ``RingQK.backward``): all-reduce of
``P^T·dO`` (dV), ring of values (dP), softmax backward (dS), all-reduce of ``scale·dS^T·Q``
(dK), ring of keys (dQ). The choices the paper leaves open are listed in ``oracle/rsa.py``.

RSA always computes on torch, whatever ``backend`` says (see Design, *Public API*): its full score
rows, kept for backward, are the point of the method. Saved for backward: q, k, v and P
(B, Hq, S/W, S) in the inputs' dtype, O(S²/W).
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm
from sptutor.checks import check_qkv


def _ring_pass(block, group, phase):
    """Send ``block`` round the ring (W-1 hops), yielding what this rank holds at each step.

    Yields (src, block): at each step this rank holds ``block``, rank src's tensor. The hop after
    step s starts before step s's compute (it travels while we compute) and is logged with step s.
    """
    rank, W = comm.rank_and_size(group)
    for step in range(W):
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = comm.ring_shift([block], group, phase=phase, step=step)
        yield (rank - step) % W, block
        if step < W - 1:
            (block,) = shift.wait()


def _columns(src, tokens):
    """The score columns (or full-length rows) of rank src's keys: block(src)."""
    return slice(src * tokens, (src + 1) * tokens)


def _rows_by_kv_head(rows, heads_kv):
    """(B, Hq, S_q, S_k) -> (B, Hkv, G, S_q, S_k): score rows grouped by the K/V head they use."""
    batch, heads_q, seq_q, seq_k = rows.shape
    return rows.reshape(batch, heads_kv, heads_q // heads_kv, seq_q, seq_k)


def _ring_of_keys(q, k, positions, causal, scale, group):
    """Stage 1: K travels the ring; this rank fills its score rows block by block.

    q: (B, S/W, Hq, D); k: (B, S/W, Hkv, D). Returns scores: (B, Hq, S/W, S) in the
    accumulation dtype, scaled, -inf where masked (fully masked blocks are never computed).
    """
    rank, W = comm.rank_and_size(group)
    batch, tokens, heads_q, _ = q.shape
    acc = blocks.accumulation_dtype(q.dtype)
    scores = torch.full(
        (batch, heads_q, tokens, W * tokens), float("-inf"), dtype=acc, device=q.device
    )
    for src, k_block in _ring_pass(k, group, "forward"):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue  # fully masked by positions: the columns stay -inf (the block still travels)
        # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
        q_grouped = blocks.group_query_heads(q, k_block.shape[2]).to(acc)
        block = torch.einsum("bqhgd,bkhd->bhgqk", q_grouped, k_block.to(acc)) * scale
        visible = blocks.visible_pairs(positions[rank], positions[src], causal)
        block = block.reshape(batch, heads_q, tokens, tokens)  # (B, Hq, S/W, S/W)
        scores[..., _columns(src, tokens)] = block.masked_fill(~visible, float("-inf"))
    return scores


def _softmax(scores, dtype):
    """Softmax over full rows: scores (B, Hq, S/W, S) -> lse (B, Hq, S/W) and P in ``dtype``.

    A row that sees no key has lse -inf and P 0.
    """
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S/W)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(scores - finite_lse[..., None]).to(dtype)


def _ring_of_values(probs, v, positions, causal, group):
    """Stage 2: V travels the ring; ``out += P[:, :, block(src)]·v_src`` (paper eq. 4).

    probs: (B, Hq, S/W, S) as stored; v: (B, S/W, Hkv, D).
    Returns out: (B, S/W, Hq, D) in the accumulation dtype.
    """
    rank, _ = comm.rank_and_size(group)
    batch, heads_q, tokens, _ = probs.shape
    acc = blocks.accumulation_dtype(v.dtype)
    out = torch.zeros(batch, tokens, heads_q, v.shape[3], dtype=acc, device=v.device)
    for src, v_block in _ring_pass(v, group, "forward"):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue
        p_block = _rows_by_kv_head(probs[..., _columns(src, tokens)], v_block.shape[2])
        block_out = torch.einsum("bhgqk,bkhd->bqhgd", p_block.to(acc), v_block.to(acc))
        out += block_out.reshape(out.shape)  # (B, S/W, Hq, D)
    return out


def _forward(q, k, v, positions, causal, scale, group):
    """q: (B, S/W, Hq, D); k, v: (B, S/W, Hkv, D); positions: W x (S/W,), every group rank's.

    Returns out: (B, S/W, Hq, D) in q's dtype, lse: (B, Hq, S/W) in the accumulation dtype, and
    probs: (B, Hq, S/W, S) in q's dtype (kept for backward).
    """
    scores = _ring_of_keys(q, k, positions, causal, scale, group)
    lse, probs = _softmax(scores, q.dtype)
    out = _ring_of_values(probs, v, positions, causal, group)
    return out.to(q.dtype), lse, probs


def _all_reduced_key_gradient(weights, rows, heads_kv, factor, group):
    """``factor·weights^T·rows`` for every key, summed over ranks; this rank keeps its own rows.

    weights: (B, Hq, S/W, S) (P for dV, dS for dK); rows: (B, S/W, Hq, D) (dout for dV, q for
    dK). This rank's product (B, S, Hkv, D), summed over the query heads of a K/V head, is its
    local queries' share of every key's gradient; the all-reduce adds the shares.
    Returns (B, S/W, Hkv, D) in the accumulation dtype.
    """
    rank, _ = comm.rank_and_size(group)
    tokens = rows.shape[1]
    acc = blocks.accumulation_dtype(rows.dtype)
    # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
    rows_grouped = blocks.group_query_heads(rows, heads_kv).to(acc)
    weights_grouped = _rows_by_kv_head(weights, heads_kv).to(acc)  # (B, Hkv, G, S/W, S)
    share = torch.einsum("bhgqk,bqhgd->bkhd", weights_grouped, rows_grouped)  # (B, S, Hkv, D)
    summed = comm.all_reduce(factor * share, group, phase="backward")
    return summed[:, _columns(rank, tokens)]


def _ring_of_values_backward(dout, v, positions, causal, group):
    """V travels the ring again: ``dP[:, :, block(src)] = dO·v_src^T``.

    dout: (B, S/W, Hq, D); v: (B, S/W, Hkv, D). Returns dprobs: (B, Hq, S/W, S) in the
    accumulation dtype; fully masked blocks stay 0 (their P is 0, so dS is 0 there anyway).
    """
    rank, W = comm.rank_and_size(group)
    batch, tokens, heads_q, _ = dout.shape
    acc = blocks.accumulation_dtype(dout.dtype)
    dprobs = torch.zeros(batch, heads_q, tokens, W * tokens, dtype=acc, device=dout.device)
    for src, v_block in _ring_pass(v, group, "backward"):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue
        # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
        dout_grouped = blocks.group_query_heads(dout, v_block.shape[2]).to(acc)
        block = torch.einsum("bqhgd,bkhd->bhgqk", dout_grouped, v_block.to(acc))
        dprobs[..., _columns(src, tokens)] = block.reshape(batch, heads_q, tokens, tokens)
    return dprobs


def _softmax_backward(probs, dprobs):
    """``dS = P ⊙ (dP - rowsum(P ⊙ dP))``, the softmax Jacobian on full rows (B, Hq, S/W, S)."""
    probs = probs.to(dprobs.dtype)
    return probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))


def _ring_of_keys_backward(dscores, k, positions, causal, scale, group):
    """K travels the ring again: ``dQ += scale·dS[:, :, block(src)]·k_src``.

    dscores: (B, Hq, S/W, S); k: (B, S/W, Hkv, D). Returns dq: (B, S/W, Hq, D) in the
    accumulation dtype.
    """
    rank, _ = comm.rank_and_size(group)
    batch, heads_q, tokens, _ = dscores.shape
    acc = dscores.dtype
    dq = torch.zeros(batch, tokens, heads_q, k.shape[3], dtype=acc, device=k.device)
    for src, k_block in _ring_pass(k, group, "backward"):
        if not blocks.any_visible(positions[rank], positions[src], causal):
            continue
        ds_block = _rows_by_kv_head(dscores[..., _columns(src, tokens)], k_block.shape[2])
        block_dq = torch.einsum("bhgqk,bkhd->bqhgd", ds_block, k_block.to(acc)) * scale
        dq += block_dq.reshape(dq.shape)  # (B, S/W, Hq, D)
    return dq


def _backward(dout, q, k, v, probs, positions, causal, scale, group):
    """dout: (B, S/W, Hq, D); probs: (B, Hq, S/W, S) stored by the forward; q, k, v as in
    ``_forward``. Returns dq: (B, S/W, Hq, D) and dk, dv: (B, S/W, Hkv, D), in q's dtype.
    """
    heads_kv = k.shape[2]
    dv = _all_reduced_key_gradient(probs, dout, heads_kv, 1.0, group)
    dprobs = _ring_of_values_backward(dout, v, positions, causal, group)
    dscores = _softmax_backward(probs, dprobs)
    dk = _all_reduced_key_gradient(dscores, q, heads_kv, scale, group)
    dq = _ring_of_keys_backward(dscores, k, positions, causal, scale, group)
    dtype = q.dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, causal, scale, group):
        out, lse, probs = _forward(q, k, v, positions, causal, scale, group)
        ctx.save_for_backward(q, k, v, probs)
        ctx.options = (positions, causal, scale, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, probs = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, probs, *ctx.options)
        return dq, dk, dv, None, None, None, None


def rsa_attention(
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
    """Ring Self-Attention over the ranks of ``group``; call on every rank with its own shards.

    q: (B, S/W, Hq, D) this rank's queries; k, v: (B, S/W, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them. ``backend`` is checked
    but RSA always computes on torch (see Design, *Public API*).
    Returns out: (B, S/W, Hq, D) this rank's output (differentiable), and with ``return_lse`` also
    lse: (B, Hq, S/W) (detached, float32; float64 for float64 inputs).
    """
    check_qkv(q, k, v)
    # a bad backend name is an error, but the full score rows stay in torch (Design, *Public API*)
    positions, _, scale = backends.prepare(
        "rsa", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse,
    )  # fmt: skip
    out, lse = _RingSelfAttention.apply(q, k, v, positions, causal, scale, group)
    return (out, lse) if return_lse else out
