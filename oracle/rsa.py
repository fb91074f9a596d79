"""Ring Self-Attention (RSA, Li et al. 2021), emulated: full score rows, then rings of K and V.

Forward, the paper's ``RingQK`` then ``RingAV`` (its §3.1 and its code):

1. Ring of keys (W-1 hops): rank r fills its full score rows ``S^r: (B, Hq, S/W, S)`` block by
   block, ``S^r[:, :, block(src)] = scale·q·k_src^T``, masked from global positions.
2. Softmax over the whole row, no online softmax: ``P = exp(S - lse)``.
3. Ring of values (W-1 hops): ``out = sum_src P[:, :, block(src)]·v_src`` (paper eq. 4).

Backward, the paper's code (``RingAV.backward`` then ``RingQK.backward``; the paper itself only
summarises it):

1. ``P^T·dO``: the local queries' share of the gradient of *every* key's value, (B, S, Hkv, D);
   all-reduce, each rank keeps its own rows.
2. Ring of values again (W-1 hops): ``dP[:, :, block(src)] = dO·v_src^T``.
3. Softmax backward: ``dS = P ⊙ (dP - rowsum(P ⊙ dP))``.
4. ``scale·dS^T·Q`` for every key, all-reduce, keep own rows.
5. Ring of keys again (W-1 hops): ``dQ += scale·dS[:, :, block(src)]·k_src``.

Messages of every rank, in order. Forward: K sends (steps 0..W-2), then V sends (steps 0..W-2).
Backward: all_reduce of dV, V sends (steps 0..W-2), all_reduce of dK, K sends (steps 0..W-2) —
the order in which autograd runs the paper's two functions, each all-reducing before its ring.

Choices, where the paper leaves room:

- ``block(src)`` are the columns (or full-length gradient rows) ``[src·S/W, (src+1)·S/W)``: keys
  in source-rank order, whatever the layout; masks always come from ``positions[src]``.
- P is stored in the inputs' dtype, as the paper's code stores its softmax output, so the
  O(S²/W) memory is the paper's; it is computed in the accumulation dtype and rounded once, and
  the forward uses the stored P so that forward and backward agree.
- All-reduce, then keep own rows, as the paper does (so its byte count holds); a reduce-scatter
  would send half as much.
- A row that sees no key (possible only with custom positions) gets P 0 and lse -inf.
- No division by W: Colossal-AI divides dQ, dK, dV by N, a scaling tied to its own gradient
  averaging; we return the true gradients.
- Causal masks and GQA are ours (the paper treats bidirectional multi-head attention only).
- Compute events count D multiply-adds per visible (query, key) pair and query head for each
  product: QK^T and PV forward; dV, dP, dK and dQ backward (no recomputation: P is stored).

Saved for backward per rank: its q, k, v shards and P (B, Hq, S/W, S).
Mirrors ``sptutor/rsa.py`` step for step; here index ``r`` of each list is rank r.
"""

from __future__ import annotations

import torch

from sptutor import blocks, work
from sptutor.oracle.world import RankRecord, World, nbytes


def _ring_pass(world, tensors, phase):
    """Send ``tensors`` round the ring (W-1 hops), yielding what each rank holds at each step.

    Yields (step, rank, src, block): at ``step`` rank ``rank`` holds ``block``, rank src's tensor.
    The hop after step s is logged with step s, once every rank has used its block.
    """
    held = list(tensors)
    for step in range(world.size):
        for rank in range(world.size):
            yield step, rank, (rank - step) % world.size, held[rank]
        if step < world.size - 1:
            held = [row[0] for row in world.ring_shift([[x] for x in held], phase=phase,
                                                       step=step).wait()]  # fmt: skip


def _columns(src, tokens):
    """The score columns (or full-length rows) of rank src's keys: block(src)."""
    return slice(src * tokens, (src + 1) * tokens)


def _rows_by_kv_head(rows, heads_kv):
    """(B, Hq, S_q, S_k) -> (B, Hkv, G, S_q, S_k): score rows grouped by the K/V head they use."""
    batch, heads_q, seq_q, seq_k = rows.shape
    return rows.reshape(batch, heads_kv, heads_q // heads_kv, seq_q, seq_k)


def _product_macs(rows, q_pos, k_pos, causal):
    """Useful multiply-adds of one product over the visible pairs: D per pair and query head.

    rows: (B, S/W, Hq, D), this rank's queries (or dout); half of ``attention_macs``' 2·D.
    """
    batch, _, heads_q, head_dim = rows.shape
    return work.attention_macs(q_pos, k_pos, causal, batch, heads_q, head_dim) // 2


def _ring_of_keys(world, q, k, positions, causal, scale):
    """Stage 1: K travels the ring; each rank fills its score rows block by block.

    q: W x (B, S/W, Hq, D); k: W x (B, S/W, Hkv, D). Returns scores: W x (B, Hq, S/W, S) in the
    accumulation dtype, scaled, -inf where masked (fully masked blocks are never computed).
    """
    batch, tokens, heads_q, _ = q[0].shape
    acc = blocks.accumulation_dtype(q[0].dtype)
    scores = [
        torch.full((batch, heads_q, tokens, world.size * tokens), float("-inf"), dtype=acc)
        for _ in q
    ]
    for step, rank, src, k_block in _ring_pass(world, k, "forward"):
        macs = _product_macs(q[rank], positions[rank], positions[src], causal)
        if macs == 0:
            continue  # fully masked by positions: the columns stay -inf (the block still travels)
        # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
        q_grouped = blocks.group_query_heads(q[rank], k_block.shape[2]).to(acc)
        block = torch.einsum("bqhgd,bkhd->bhgqk", q_grouped, k_block.to(acc)) * scale
        visible = blocks.visible_pairs(positions[rank], positions[src], causal)
        block = block.reshape(batch, heads_q, tokens, tokens)  # (B, Hq, S/W, S/W)
        scores[rank][..., _columns(src, tokens)] = block.masked_fill(~visible, float("-inf"))
        world.compute(rank, macs, "forward", step)
    return scores


def _softmax(scores, dtype):
    """Softmax over full rows: scores (B, Hq, S/W, S) -> lse (B, Hq, S/W) and P in ``dtype``.

    A row that sees no key has lse -inf and P 0.
    """
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S/W)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(scores - finite_lse[..., None]).to(dtype)


def _ring_of_values(world, probs, v, positions, causal):
    """Stage 2: V travels the ring; ``out += P[:, :, block(src)]·v_src`` (paper eq. 4).

    probs: W x (B, Hq, S/W, S) as stored; v: W x (B, S/W, Hkv, D).
    Returns out: W x (B, S/W, Hq, D) in the accumulation dtype.
    """
    batch, heads_q, tokens, _ = probs[0].shape
    acc = blocks.accumulation_dtype(v[0].dtype)
    out = [torch.zeros(batch, tokens, heads_q, v[0].shape[3], dtype=acc) for _ in probs]
    for step, rank, src, v_block in _ring_pass(world, v, "forward"):
        macs = _product_macs(out[rank], positions[rank], positions[src], causal)
        if macs == 0:
            continue
        p_block = _rows_by_kv_head(probs[rank][..., _columns(src, tokens)], v_block.shape[2])
        block_out = torch.einsum("bhgqk,bkhd->bqhgd", p_block.to(acc), v_block.to(acc))
        out[rank] += block_out.reshape(out[rank].shape)  # (B, S/W, Hq, D)
        world.compute(rank, macs, "forward", step)
    return out


def _forward(world, q, k, v, positions, causal, scale):
    """q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); positions: W x (S/W,).

    Returns out: W x (B, S/W, Hq, D) in q's dtype, lse: W x (B, Hq, S/W) in the accumulation
    dtype, and probs: W x (B, Hq, S/W, S) in q's dtype (kept for backward).
    """
    scores = _ring_of_keys(world, q, k, positions, causal, scale)
    lse, probs = zip(*(_softmax(rows, q[0].dtype) for rows in scores))
    out = _ring_of_values(world, probs, v, positions, causal)
    return [o.to(q[0].dtype) for o in out], list(lse), list(probs)


def _all_reduced_key_gradient(world, weights, rows, heads_kv, positions, causal, factor):
    """``factor·weights^T·rows`` for every key, summed over ranks; each keeps its own rows.

    weights: W x (B, Hq, S/W, S) (P for dV, dS for dK); rows: W x (B, S/W, Hq, D) (dout for dV,
    q for dK). Each rank's product (B, S, Hkv, D), summed over the query heads of a K/V head, is
    its local queries' share of every key's gradient; the all-reduce adds the shares.
    Returns W x (B, S/W, Hkv, D) in the accumulation dtype.
    """
    tokens = rows[0].shape[1]
    acc = blocks.accumulation_dtype(rows[0].dtype)
    column_positions = torch.cat(positions)  # (S,) global position of each score column
    shares = []
    for rank in range(world.size):
        # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
        rows_grouped = blocks.group_query_heads(rows[rank], heads_kv).to(acc)
        weights_grouped = _rows_by_kv_head(weights[rank], heads_kv).to(acc)  # (B, Hkv, G, S/W, S)
        share = torch.einsum("bhgqk,bqhgd->bkhd", weights_grouped, rows_grouped)  # (B, S, Hkv, D)
        shares.append(factor * share)
        macs = _product_macs(rows[rank], positions[rank], column_positions, causal)
        world.compute(rank, macs, "backward")
    summed = world.all_reduce(shares, phase="backward")
    return [full[:, _columns(rank, tokens)] for rank, full in enumerate(summed)]


def _ring_of_values_backward(world, dout, v, positions, causal):
    """V travels the ring again: ``dP[:, :, block(src)] = dO·v_src^T``.

    dout: W x (B, S/W, Hq, D); v: W x (B, S/W, Hkv, D). Returns dprobs: W x (B, Hq, S/W, S) in
    the accumulation dtype; fully masked blocks stay 0 (their P is 0, so dS is 0 there anyway).
    """
    batch, tokens, heads_q, _ = dout[0].shape
    acc = blocks.accumulation_dtype(dout[0].dtype)
    dprobs = [torch.zeros(batch, heads_q, tokens, world.size * tokens, dtype=acc) for _ in dout]
    for step, rank, src, v_block in _ring_pass(world, v, "backward"):
        macs = _product_macs(dout[rank], positions[rank], positions[src], causal)
        if macs == 0:
            continue
        # (B, S/W, Hq, D) -> (B, S/W, Hkv, G, D)
        dout_grouped = blocks.group_query_heads(dout[rank], v_block.shape[2]).to(acc)
        block = torch.einsum("bqhgd,bkhd->bhgqk", dout_grouped, v_block.to(acc))
        dprobs[rank][..., _columns(src, tokens)] = block.reshape(batch, heads_q, tokens, tokens)
        world.compute(rank, macs, "backward", step)
    return dprobs


def _softmax_backward(probs, dprobs):
    """``dS = P ⊙ (dP - rowsum(P ⊙ dP))``, the softmax Jacobian on full rows (B, Hq, S/W, S)."""
    probs = probs.to(dprobs.dtype)
    return probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))


def _ring_of_keys_backward(world, dscores, k, positions, causal, scale):
    """K travels the ring again: ``dQ += scale·dS[:, :, block(src)]·k_src``.

    dscores: W x (B, Hq, S/W, S); k: W x (B, S/W, Hkv, D). Returns dq: W x (B, S/W, Hq, D) in
    the accumulation dtype.
    """
    batch, heads_q, tokens, _ = dscores[0].shape
    acc = dscores[0].dtype
    dq = [torch.zeros(batch, tokens, heads_q, k[0].shape[3], dtype=acc) for _ in dscores]
    for step, rank, src, k_block in _ring_pass(world, k, "backward"):
        macs = _product_macs(dq[rank], positions[rank], positions[src], causal)
        if macs == 0:
            continue
        ds_block = _rows_by_kv_head(dscores[rank][..., _columns(src, tokens)], k_block.shape[2])
        block_dq = torch.einsum("bhgqk,bkhd->bqhgd", ds_block, k_block.to(acc)) * scale
        dq[rank] += block_dq.reshape(dq[rank].shape)  # (B, S/W, Hq, D)
        world.compute(rank, macs, "backward", step)
    return dq


def _backward(world, dout, q, k, v, probs, positions, causal, scale):
    """dout: W x (B, S/W, Hq, D); probs: W x (B, Hq, S/W, S) stored by the forward; q, k, v as in
    ``_forward``. Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D), in q's dtype.
    """
    heads_kv = k[0].shape[2]
    dv = _all_reduced_key_gradient(world, probs, dout, heads_kv, positions, causal, 1.0)
    dprobs = _ring_of_values_backward(world, dout, v, positions, causal)
    dscores = [_softmax_backward(p, dp) for p, dp in zip(probs, dprobs)]
    dk = _all_reduced_key_gradient(world, dscores, q, heads_kv, positions, causal, scale)
    dq = _ring_of_keys_backward(world, dscores, k, positions, causal, scale)
    dtype = q[0].dtype
    return [x.to(dtype) for x in dq], [x.to(dtype) for x in dk], [x.to(dtype) for x in dv]


def emulate(
    world: World, q, k, v, dout, *, positions, causal: bool, scale: float
) -> list[RankRecord]:
    """Run RSA on the emulated ``world``; returns one ``RankRecord`` per rank.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S/W,) the global positions each rank owns. Each rank keeps q, k, v and its
    probabilities P (B, Hq, S/W, S) for backward (``saved_bytes``): O(S²/W).
    """
    out, lse, probs = _forward(world, q, k, v, positions, causal, scale)
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(map(nbytes, (qr, kr, vr, p))))
        for qr, kr, vr, o, l, p in zip(q, k, v, out, lse, probs)
    ]
    if dout is not None:
        grads = _backward(world, dout, q, k, v, probs, positions, causal, scale)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
