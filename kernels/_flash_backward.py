"""The FlashAttention-2 backward as three deterministic kernels (no atomics).

With ``P = exp(S·scale - lse)`` (the final softmax restricted to this block of keys) and
``delta = rowsum(dO ⊙ O)``: ``dV = P^T dO``, ``dS = P ⊙ (dO V^T - delta)``, ``dQ = scale·dS K``,
``dK = scale·dS^T Q`` — the equations of :func:`sptutor.blocks.attention_block_backward`.

1. ``_delta_kernel``: delta per row (reads dO and O once).
2. ``_dkdv_kernel``: one program per (key tile, batch·K/V head) keeps its dK, dV in registers and
   streams the query tiles that see it, for every query head of its GQA group in turn: each dK, dV
   row is written by exactly one program, so no atomics and a deterministic sum.
3. ``_dq_kernel``: one program per (query tile, batch·query head) streams the key tiles it sees.

P is recomputed in both (FA2's trade: a second Q K^T instead of atomics on dQ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sptutor.kernels import _tiles
from sptutor.kernels._tiles import same_document

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2(e))


@triton.jit
def _delta_kernel(
    DOUT, OUT, DELTA, stride_b, stride_s, stride_h, seq_q, heads_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO ⊙ O): (B, Hq, S_q) in the accumulation dtype."""
    q_tile, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // heads_q, batch_head % heads_q
    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < head_dim)[None, :]
    offsets = batch.to(tl.int64) * stride_b + head * stride_h
    offsets += offs_m[:, None] * stride_s + offs_d[None, :]
    acc_dtype = DELTA.dtype.element_ty
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(acc_dtype)
    out = tl.load(OUT + offsets, mask=mask, other=0.0).to(acc_dtype)
    delta = tl.sum(dout * out, 1)
    tl.store(DELTA + batch_head.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _row_stats(LSE, DELTA, batch_head, rows, seq_q):
    """The final lse (log2 units; rows that see nothing get 0, so P = 0) and delta of some rows."""
    offsets = batch_head.to(tl.int64) * seq_q + rows
    lse = tl.load(LSE + offsets, mask=rows < seq_q, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(DELTA + offsets, mask=rows < seq_q, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, Q_POS, K_POS, Q_DOC, K_DOC, TILE_COUNT, TILE_INDEX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    seq_q, seq_k, heads_kv, head_dim, tiles_q,
    SCALE: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of one (batch, K/V head), summed over its G query heads.

    Works with transposed tiles (keys as rows) so every product is a plain ``tl.dot``.
    q/dout/dq share strides (q's), k/v/dk/dv share k's. Q_DOC, K_DOC: read only when DOCUMENTS.
    """
    k_tile, batch_head = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_head // heads_kv, batch_head % heads_kv
    cols = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (cols < seq_k)[:, None] & d_ok[None, :]
    kv_offsets = batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    kv_offsets += cols[:, None] * stride_ks + offs_d[None, :]
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    k_pos = tl.load(K_POS + cols, mask=cols < seq_k, other=0)
    if DOCUMENTS:
        k_doc = tl.load(K_DOC + cols, mask=cols < seq_k, other=-1)
    acc_dtype = LSE.dtype.element_ty
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
    for group_index in range(GROUP):  # the query heads sharing this K/V head (GQA), in turn
        head = kv_head * GROUP + group_index
        q_base = batch.to(tl.int64) * stride_qb + head * stride_qh
        for i in range(tl.load(TILE_COUNT + k_tile)):  # only the query tiles that see this tile
            rows = tl.load(TILE_INDEX + k_tile * tiles_q + i) * BLOCK_M + offs_m
            q_offsets = q_base + rows[:, None] * stride_qs + offs_d[None, :]
            q_mask = (rows < seq_q)[:, None] & d_ok[None, :]
            q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
            dout = tl.load(DOUT + q_offsets, mask=q_mask, other=0.0)
            lse, delta = _row_stats(LSE, DELTA, batch * GROUP * heads_kv + head, rows, seq_q)
            # P^T = exp2(S^T·scale - lse), 0 where masked: beyond S_q, causal q_pos < k_pos, or
            # another document (or padding)
            scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * (SCALE * LOG2E)
            visible = (rows < seq_q)[None, :]
            if CAUSAL:
                q_pos = tl.load(Q_POS + rows, mask=rows < seq_q, other=0)
                visible = visible & (k_pos[:, None] <= q_pos[None, :])
            if DOCUMENTS:
                q_doc = tl.load(Q_DOC + rows, mask=rows < seq_q, other=-1)
                visible = visible & same_document(k_doc, q_doc)
            probs_t = tl.where(visible, tl.exp2(scores_t - lse[None, :]), 0.0)
            dv = tl.dot(probs_t.to(dout.dtype), dout, dv, input_precision=PRECISION)  # dV += P^T dO
            dprobs_t = tl.dot(v, tl.trans(dout), input_precision=PRECISION)  # dP^T = V dO^T
            dscores_t = probs_t * (dprobs_t - delta[None, :])  # dS^T = P^T ⊙ (dP^T - delta)
            dk = tl.dot(dscores_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q
    tl.store(DK + kv_offsets, dk * SCALE, mask=kv_mask)
    tl.store(DV + kv_offsets, dv, mask=kv_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, Q_POS, K_POS, Q_DOC, K_DOC, TILE_COUNT, TILE_INDEX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    seq_q, seq_k, heads_q, head_dim, tiles_k,
    SCALE: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of one (batch, query head); Q_DOC, K_DOC read only when DOCUMENTS."""
    q_tile, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // heads_q, batch_head % heads_q
    kv_head = head // GROUP
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_offsets = batch.to(tl.int64) * stride_qb + head * stride_qh
    q_offsets += rows[:, None] * stride_qs + offs_d[None, :]
    q_mask = (rows < seq_q)[:, None] & d_ok[None, :]
    q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
    dout = tl.load(DOUT + q_offsets, mask=q_mask, other=0.0)
    q_pos = tl.load(Q_POS + rows, mask=rows < seq_q, other=0)
    if DOCUMENTS:
        q_doc = tl.load(Q_DOC + rows, mask=rows < seq_q, other=-1)
    lse, delta = _row_stats(LSE, DELTA, batch_head, rows, seq_q)
    kv_base = batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=LSE.dtype.element_ty)
    for i in range(tl.load(TILE_COUNT + q_tile)):  # only the key tiles this tile sees
        cols = tl.load(TILE_INDEX + q_tile * tiles_k + i) * BLOCK_N + offs_n
        kv_offsets = kv_base + cols[:, None] * stride_ks + offs_d[None, :]
        kv_mask = (cols < seq_k)[:, None] & d_ok[None, :]
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
        visible = (cols < seq_k)[None, :]
        if CAUSAL:
            k_pos = tl.load(K_POS + cols, mask=cols < seq_k, other=0)
            visible = visible & (q_pos[:, None] >= k_pos[None, :])
        if DOCUMENTS:
            k_doc = tl.load(K_DOC + cols, mask=cols < seq_k, other=-1)
            visible = visible & same_document(q_doc, k_doc)
        probs = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)  # P = exp2(S - lse)
        dprobs = tl.dot(dout, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        dscores = probs * (dprobs - delta[:, None])  # dS = P ⊙ (dP - delta)
        dq = tl.dot(dscores.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
    tl.store(DQ + q_offsets, dq * SCALE, mask=q_mask)


def attention_backward_kernels(
    dout, q, k, v, out, lse, dq, dk, dv, q_pos, k_pos, q_doc, k_doc, causal, scale, precision, cfg
) -> None:
    """Launch the three kernels, writing dq: (B, S_q, Hq, D), dk, dv: (B, S_k, Hkv, D).

    Every tensor is contiguous; q, dout, out, dq share q's shape and k, v, dk, dv share k's.
    q_doc, k_doc: int32 document ids (S_q,), (S_k,), or both None.
    """
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    block_m, block_n, block_d = cfg.block_m, cfg.block_n, _tiles.block_d(head_dim)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=q.device)
    q_grid = (triton.cdiv(seq_q, block_m), batch * heads_q)
    _delta_kernel[q_grid](
        dout, out, delta, *_tiles.strides(q), seq_q, heads_q, head_dim,
        BLOCK_M=block_m, BLOCK_D=block_d, **launch,
    )  # fmt: skip
    documents = q_doc is not None  # without, the kernels never read Q_DOC, K_DOC: pass positions
    masks = (q_pos, k_pos, *((q_doc, k_doc) if documents else (q_pos, k_pos)))
    common = dict(SCALE=scale, GROUP=heads_q // heads_kv, CAUSAL=causal, DOCUMENTS=documents,
                  PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  **launch)  # fmt: skip
    schedule = dict(q_doc=q_doc, k_doc=k_doc)
    counts, tiles = _tiles.tile_schedule(q_pos, k_pos, causal, block_m, block_n, by_key=True,
                                         **schedule)  # fmt: skip
    _dkdv_kernel[(triton.cdiv(seq_k, block_n), batch * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, *masks, counts, tiles,
        *_tiles.strides(q), *_tiles.strides(k), seq_q, seq_k, heads_kv, head_dim, tiles.shape[1],
        **common,
    )  # fmt: skip
    counts, tiles = _tiles.tile_schedule(q_pos, k_pos, causal, block_m, block_n, **schedule)
    _dq_kernel[q_grid](
        q, k, v, dout, lse, delta, dq, *masks, counts, tiles,
        *_tiles.strides(q), *_tiles.strides(k), seq_q, seq_k, heads_q, head_dim, tiles.shape[1],
        **common,
    )  # fmt: skip
