"""FlashAttention-2 in Triton: the block primitive of ``sptutor.blocks`` as fused kernels.

The same contract as :func:`sptutor.blocks.attention_block` and
:func:`sptutor.blocks.attention_block_backward`: masks from global positions (one kernel serves
every layout and every ring step), packed documents from per-token document ids (padding -1),
GQA by indexing the K/V head, rows that see no key get out 0 and lse -inf, and the backward takes
the *final* out and lse of the rows.

Forward: one program per (query tile, batch·head) streams the key tiles of its schedule through
an online softmax, in log2 units (``exp2`` is what the GPU computes natively). Key tiles that no
query of the tile can see (causally, or by document) are never visited (``_tiles.tile_schedule``).
The backward kernels are in ``_flash_backward.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sptutor.kernels import _tiles
from sptutor.kernels._flash_backward import attention_backward_kernels
from sptutor.kernels._tiles import TileConfig, same_document

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2(e))
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _forward_kernel(
    Q, K, V, OUT, LSE, Q_POS, K_POS, Q_DOC, K_DOC, TILE_COUNT, TILE_INDEX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    seq_q, seq_k, heads_q, head_dim, tiles_k,
    SCALE: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, DOCUMENTS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query tile of one (batch, query head): out and lse of its BLOCK_M rows.

    Q_DOC, K_DOC: int32 document ids, read only when DOCUMENTS (else any pointer)."""
    q_tile, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // heads_q, batch_head % heads_q
    kv_head = head // GROUP  # GQA: query heads kv_head·G .. kv_head·G+G-1 share one K/V head
    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_base = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
    q_mask = (offs_m < seq_q)[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    q_pos = tl.load(Q_POS + offs_m, mask=offs_m < seq_q, other=0)
    if DOCUMENTS:
        q_doc = tl.load(Q_DOC + offs_m, mask=offs_m < seq_q, other=-1)

    acc_dtype = LSE.dtype.element_ty  # float32, float64 for float64 inputs
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)  # m_i
    row_sum = tl.zeros([BLOCK_M], dtype=acc_dtype)  # l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)  # unnormalised O_i
    for i in range(tl.load(TILE_COUNT + q_tile)):  # only the key tiles this tile can see
        start_n = tl.load(TILE_INDEX + q_tile * tiles_k + i) * BLOCK_N
        cols = start_n + offs_n
        kv_mask = (cols < seq_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        # S = Q K^T · scale in log2 units (exp(x) = exp2(x·log2 e)), -inf where masked: beyond S_k,
        # causal q_pos < k_pos, or another document (or padding). (SCALE * LOG2E) stays inline:
        # the interpreter rounds a constexpr product kept in a variable to float32.
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
        visible = (cols < seq_k)[None, :]
        if CAUSAL:
            k_pos = tl.load(K_POS + cols, mask=cols < seq_k, other=0)
            visible = visible & (q_pos[:, None] >= k_pos[None, :])
        if DOCUMENTS:
            k_doc = tl.load(K_DOC + cols, mask=cols < seq_k, other=-1)
            visible = visible & same_document(q_doc, k_doc)
        scores = tl.where(visible, scores, float("-inf"))
        # online softmax (FA2): m_new = max(m, rowmax S); rescale l and O by exp2(m - m_new)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
        probs = tl.exp2(scores - shift[:, None])  # P~ = exp2(S - m_new)
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(probs, 1)  # l = l·e^(m - m_new) + rowsum(P~)
        acc = acc * rescale[:, None]
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=PRECISION)  # O += P~ V
        row_max = new_max

    seen = row_sum > 0  # rows that see at least one key: out = O / l, lse = m + log l
    safe_sum = tl.where(seen, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(seen, row_max * LN2 + tl.log(safe_sum), float("-inf"))  # natural log
    o_base = OUT + batch.to(tl.int64) * stride_ob + head * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out, mask=q_mask)
    tl.store(LSE + batch_head.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


def _prepare(q, k, v, q_pos, k_pos, q_doc, k_doc, scale):
    """Checks, contiguous inputs, int32 positions and document ids, and the default scale."""
    _tiles.check_inputs(q, k, v)
    q_pos = _tiles.positions(q_pos, q.shape[1], q.device)
    k_pos = _tiles.positions(k_pos, k.shape[1], q.device)
    q_doc, k_doc = _tiles.documents(q_doc, k_doc, q.shape[1], k.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return q.contiguous(), k.contiguous(), v.contiguous(), q_pos, k_pos, q_doc, k_doc, scale


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    """Exact fp32 products by default; TF32 only when asked (see Design, *Public API*)."""
    return "tf32" if tf32 and dtype == torch.float32 else "ieee"


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    tf32: bool = False,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries over one block of keys, masks from global positions and documents.

    Args:
        q: (B, S_q, Hq, D) queries, D <= 256; float16, bfloat16 (GPU only), float32 or float64.
        k: (B, S_k, Hkv, D) keys, Hq % Hkv == 0 (GQA/MQA by indexing, never repeated).
        v: (B, S_k, Hkv, D) values.
        q_pos: (S_q,) global positions of the queries (int32/int64, default ``arange(S_q)``).
        k_pos: (S_k,) global positions of the keys (default ``arange(S_k)``).
        q_doc: (S_q,) document ids of the queries (integers; -1: padding), or None: one
            document. Give both or neither.
        k_doc: (S_k,) document ids of the keys. A query sees only keys of its own document,
            padding nothing and by nothing (``sptutor.blocks.visible_pairs``).
        causal: mask the pairs with ``q_pos < k_pos``. Key tiles no query of a tile sees
            (causally, or by document ranges) are skipped.
        scale: softmax scale, default ``D ** -0.5``. A compile-time constant of the kernel.
        out_dtype: dtype of ``out``, default q's (backends pass float32 for 16-bit inputs, as
            ``sptutor.blocks`` returns).
        tf32: use TF32 tensor cores for float32 inputs (default: exact fp32 products).
        config: tile sizes and launch parameters, default ``_tiles.flash_config``.

    Returns:
        out: (B, S_q, Hq, D), and lse: (B, Hq, S_q) natural-log log-sum-exp of each row's scores,
        float32 (float64 for float64 inputs). A row that sees no key has out 0 and lse -inf.
    """
    q, k, v, q_pos, k_pos, q_doc, k_doc, scale = _prepare(
        q, k, v, q_pos, k_pos, q_doc, k_doc, scale
    )
    batch, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    cfg = config or _tiles.flash_config(head_dim, q.dtype)
    acc_dtype = _tiles.accumulation_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seq_q, dtype=acc_dtype, device=q.device)
    if seq_q == 0:
        return out, lse
    counts, tiles = _tiles.tile_schedule(
        q_pos, k_pos, causal, cfg.block_m, cfg.block_n, q_doc=q_doc, k_doc=k_doc
    )
    grid = (triton.cdiv(seq_q, cfg.block_m), batch * heads_q)
    documents = q_doc is not None  # without, the kernel never reads Q_DOC, K_DOC: pass positions
    _forward_kernel[grid](
        q, k, v, out, lse, q_pos, k_pos, *((q_doc, k_doc) if documents else (q_pos, k_pos)),
        counts, tiles,
        *_tiles.strides(q), *_tiles.strides(k), *_tiles.strides(v), *_tiles.strides(out),
        seq_q, seq_k, heads_q, head_dim, tiles.shape[1],
        SCALE=scale, GROUP=heads_q // heads_kv, CAUSAL=causal, DOCUMENTS=documents,
        PRECISION=_precision(q.dtype, tf32), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=_tiles.block_d(head_dim), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    grad_dtype: torch.dtype | None = None,
    tf32: bool = False,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, FlashAttention-2 form, given the rows' *final* out and lse.

    Args:
        dout: (B, S_q, Hq, D) gradient of the output.
        q: (B, S_q, Hq, D) queries, as in :func:`flash_attention_forward`.
        k: (B, S_k, Hkv, D) keys.
        v: (B, S_k, Hkv, D) values.
        out: (B, S_q, Hq, D) final output of the rows (over all keys, not just this block's).
        lse: (B, Hq, S_q) their final log-sum-exp, so ``P = exp(S·scale - lse)`` is the block's
            share of the final softmax and block gradients simply add up (ring attention).
        q_pos: (S_q,) global positions of the queries (default ``arange(S_q)``).
        k_pos: (S_k,) global positions of the keys (default ``arange(S_k)``).
        q_doc: (S_q,) document ids of the queries (-1: padding), or None, as in the forward.
        k_doc: (S_k,) document ids of the keys, or None.
        causal: mask the pairs with ``q_pos < k_pos``, as in the forward.
        scale: softmax scale, default ``D ** -0.5``.
        grad_dtype: dtype of the gradients, default q's (backends pass float32 for 16-bit inputs).
        tf32: use TF32 tensor cores for float32 inputs (default: exact fp32 products).
        config: tile sizes and launch parameters, default ``_tiles.flash_config(backward=True)``.

    Returns:
        dq: (B, S_q, Hq, D), dk, dv: (B, S_k, Hkv, D). Deterministic: three kernels (delta =
        rowsum(dout ⊙ out); dK, dV per key tile; dQ per query tile), no atomics.
    """
    q, k, v, q_pos, k_pos, q_doc, k_doc, scale = _prepare(
        q, k, v, q_pos, k_pos, q_doc, k_doc, scale
    )
    batch, seq_q, heads_q, _ = q.shape
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (batch, heads_q, seq_q):
        raise ValueError(
            f"dout and out must have q's shape {tuple(q.shape)} and lse {(batch, heads_q, seq_q)}, "
            f"got {tuple(dout.shape)}, {tuple(out.shape)} and {tuple(lse.shape)}"
        )
    dout, out = dout.to(q.dtype).contiguous(), out.contiguous()
    lse = lse.to(_tiles.accumulation_dtype(q.dtype)).contiguous()
    cfg = config or _tiles.flash_config(q.shape[-1], q.dtype, backward=True)
    dq = torch.empty(q.shape, dtype=grad_dtype or q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype or q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=grad_dtype or q.dtype, device=q.device)
    if q.shape[1] == 0 or k.shape[1] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    attention_backward_kernels(
        dout, q, k, v, out, lse, dq, dk, dv, q_pos, k_pos, q_doc, k_doc, causal, scale,
        _precision(q.dtype, tf32), cfg,
    )  # fmt: skip
    return dq, dk, dv
