"""Block attention on torch's fused CPU flash kernel: the ``"fused"`` backend (``"auto"`` on CPU).

The contract of :func:`sptutor.blocks.attention_block` and its backward, computed by
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``.

The kernel has two masks for free: none, and ``is_causal`` aligned at the top left (query i sees
key j iff j <= i); an explicit S_q x S_k mask computes every pair. So a block is computed as the
sub-blocks of :func:`sptutor.fused_plan.plan` (runs of positions: no mask, ``is_causal``, or a
mask only where neither fits), and the sub-results are merged by LSE.

Kernel facts relied on (torch 2.13, CPU): float64, float32 and 16-bit inputs (16-bit: LSE in
float32; we compute in the accumulation dtype); strided (B, H, S, D) views of (B, S, H, D)
tensors are accepted, results come back in (B, S, H, D) memory; masks must be floating, not
bool; a fully masked row gets out 0 and LSE **0** (set to -inf here); an lse of -inf in backward
gives NaN (zeroed here); an empty input kills the process (never passed). GQA is probed once:
native where the kernel has it, else K/V heads are repeated and their gradients summed.
"""

from __future__ import annotations

import functools

import torch

from sptutor import blocks
from sptutor.fused_plan import Task, plan

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _check_cpu(*tensors) -> None:
    """ValueError unless every given tensor lives on the CPU."""
    elsewhere = [t.device for t in tensors if t is not None and t.device.type != "cpu"]
    if elsewhere:
        raise ValueError(
            "the fused backend runs torch's CPU flash-attention kernel and needs CPU tensors, "
            f"got one on {elsewhere[0]}; use backend='triton' or 'torch' for those"
        )


def _check_lengths(q, k, v, q_pos, k_pos, q_doc, k_doc) -> None:
    """ValueError unless the block's tokens and their positions (and ids) agree in number: the
    kernel itself would silently compute on whatever the slices hold (a wrong peer's block)."""
    for what, tokens, pos, doc in (("queries", q.shape[1], q_pos, q_doc),
                                   ("keys", k.shape[1], k_pos, k_doc),
                                   ("values", v.shape[1], k_pos, k_doc)):  # fmt: skip
        given = {len(pos)} | ({len(doc)} if doc is not None else set())
        if given != {tokens}:
            raise ValueError(
                f"a block of {tokens} {what} has {len(pos)} positions"
                + (f" and {len(doc)} document ids" if doc is not None else "")
            )


@functools.cache
def _native_gqa() -> bool:
    """Does the kernel take fewer K/V heads than query heads (query head h reads h // G)?"""
    values = (torch.arange(96, dtype=torch.float64) * 0.7).sin()  # distinct heads, no RNG used
    q, (k, v) = values[:48].reshape(1, 4, 3, 4), values[48:].reshape(2, 1, 2, 3, 4)
    try:
        native = _FORWARD(q, k, v, 0.0, False, scale=0.5)[0]
    except RuntimeError:
        return False
    grouped = (x.repeat_interleave(2, dim=1) for x in (k, v))
    return bool(torch.allclose(native, _FORWARD(q, *grouped, 0.0, False, scale=0.5)[0]))


def _kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> what the kernel takes: itself, or (B, Hq, S, D) with heads repeated."""
    if x.shape[1] == heads_q or _native_gqa():
        return x
    return x.repeat_interleave(heads_q // x.shape[1], dim=1)


def _kv_grad(g: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """The kernel's dK or dV (B, H, S, D) -> (B, S, Hkv, D), summed over each group of heads."""
    batch, heads, seq, head_dim = g.shape
    if heads != heads_kv:
        g = g.reshape(batch, heads_kv, heads // heads_kv, seq, head_dim).sum(2)
    return g.transpose(1, 2)


def _mask(task: Task, q_pos, k_pos, causal, q_doc, k_doc, dtype):
    """(additive (n, m) mask or None, (n,) bool rows that see a key or None) for one task."""
    if task.kind != "masked":
        return None, None
    rows, keys = slice(task.q_lo, task.q_hi), slice(task.k_lo, task.k_hi)
    docs = (None, None) if q_doc is None else (q_doc[rows], k_doc[keys])
    visible = blocks.visible_pairs(q_pos[rows], k_pos[keys], causal, *docs)  # (n, m)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
    return mask, visible.any(-1)


def _heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S, H, D) -> a (B, H, S, D) view in ``dtype`` (a copy only if the dtype changes)."""
    return x.to(dtype).transpose(1, 2)


def _add(total: torch.Tensor | None, part: torch.Tensor, span: slice, shape, dtype):
    """``total`` (None: zeros of ``shape``) plus ``part`` on ``span`` of dim 1. A part over all
    of dim 1 meeting None is taken as it is: no zeros written, no copy."""
    if total is None and part.shape[1] == shape[1]:
        return part
    total = torch.zeros(shape, dtype=dtype) if total is None else total
    total[:, span] += part
    return total


def _unseen(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """out 0 (B, S_q, Hq, D) of ``shape`` and lse -inf (B, Hq, S_q): rows that saw no key."""
    batch, seq, heads, _ = shape
    return torch.zeros(shape, dtype=dtype), torch.full((batch, heads, seq), -torch.inf, dtype=dtype)


def _tasks(q, k, q_pos, k_pos, causal, q_doc, k_doc) -> list[Task]:
    """The block's kernel calls (none for an empty block: the kernel must never see one)."""
    if q.numel() == 0 or k.numel() == 0:
        return []
    return plan(q_pos, k_pos, causal, q_doc, k_doc, work=q.numel() // q.shape[1])  # B·Hq·D


def attention_forward(q, k, v, q_pos, k_pos, causal: bool, scale: float, q_doc=None, k_doc=None):
    """:func:`sptutor.blocks.attention_block` on the fused CPU kernel (CPU tensors only).

    q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D), Hq % Hkv == 0; q_pos, q_doc: (S_q,); k_pos,
    k_doc: (S_k,) (documents None: one document). Returns out: (B, S_q, Hq, D) and lse:
    (B, Hq, S_q) in the accumulation dtype; a row that sees no key has out 0 and lse -inf.
    """
    _check_cpu(q, k, v, q_pos, k_pos, q_doc, k_doc)
    _check_lengths(q, k, v, q_pos, k_pos, q_doc, k_doc)
    acc = blocks.accumulation_dtype(q.dtype)
    seq_q, heads_q = q.shape[1], q.shape[2]
    q_h, k_h, v_h = (_heads(x, acc) for x in (q, k, v))  # (B, H, S, D) views
    out = lse = None  # until a task writes them
    touched = torch.zeros(seq_q, dtype=torch.bool)  # rows some task has written
    for task in _tasks(q, k, q_pos, k_pos, causal, q_doc, k_doc):
        rows, keys = slice(task.q_lo, task.q_hi), slice(task.k_lo, task.k_hi)
        mask, seen = _mask(task, q_pos, k_pos, causal, q_doc, k_doc, acc)
        part_out, part_lse = _FORWARD(
            q_h[:, :, rows], _kv_heads(k_h[:, :, keys], heads_q),
            _kv_heads(v_h[:, :, keys], heads_q), 0.0, task.kind == "causal",
            attn_mask=mask, scale=scale,
        )  # fmt: skip
        part_out, part_lse = part_out.transpose(1, 2), part_lse.contiguous()  # (B, n, Hq, D)
        if seen is not None:  # the kernel gives a fully masked row lse 0: it saw nothing
            part_lse = part_lse.masked_fill(~seen, float("-inf"))
            part_out = part_out.masked_fill(~seen[:, None, None], 0.0)
        if out is None and task.q_hi - task.q_lo == seq_q:  # first, over every row: no copy
            out, lse = part_out, part_lse
        else:
            out, lse = _unseen(q.shape, acc) if out is None else (out, lse)
            if touched[rows].any():  # merge by LSE (online softmax) with the earlier tasks
                part_out, part_lse = blocks.merge(out[:, rows], lse[:, :, rows], part_out,
                                                  part_lse)  # fmt: skip
            out[:, rows], lse[:, :, rows] = part_out, part_lse
        touched[rows] = True
    return _unseen(q.shape, acc) if out is None else (out, lse)


def attention_backward(
    dout, q, k, v, out, lse, q_pos, k_pos, causal: bool, scale: float, q_doc=None, k_doc=None
):
    """:func:`sptutor.blocks.attention_block_backward` on the fused CPU kernel (CPU only).

    dout, out: (B, S_q, Hq, D) the gradient of and the *final* output of the rows; lse:
    (B, Hq, S_q) their final LSE; q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D); positions and
    documents as :func:`attention_forward`. Returns dq: (B, S_q, Hq, D), dk, dv: (B, S_k, Hkv,
    D) in the accumulation dtype; rows whose lse is -inf (they see no key) give zero gradients.
    """
    _check_cpu(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc)
    _check_lengths(q, k, v, q_pos, k_pos, q_doc, k_doc)
    acc = blocks.accumulation_dtype(q.dtype)
    heads_q, heads_kv = q.shape[2], k.shape[2]
    empty = torch.isinf(lse)  # (B, Hq, S_q): rows that see no key: the kernel would give NaN
    blind = bool(empty.any())  # if none, no copies to clean them
    lse, dout_h = lse.to(acc), _heads(dout, acc)  # dout_h: (B, Hq, S_q, D)
    if blind:
        lse, dout_h = lse.masked_fill(empty, 0.0), dout_h.masked_fill(empty[..., None], 0.0)
    q_h, k_h, v_h, out_h = (_heads(x, acc) for x in (q, k, v, out))
    dq = dk = dv = None  # until a task adds to them
    for task in _tasks(q, k, q_pos, k_pos, causal, q_doc, k_doc):
        rows, keys = slice(task.q_lo, task.q_hi), slice(task.k_lo, task.k_hi)
        mask, _ = _mask(task, q_pos, k_pos, causal, q_doc, k_doc, acc)
        part_dq, part_dk, part_dv = _BACKWARD(
            dout_h[:, :, rows], q_h[:, :, rows], _kv_heads(k_h[:, :, keys], heads_q),
            _kv_heads(v_h[:, :, keys], heads_q), out_h[:, :, rows], lse[:, :, rows], 0.0,
            task.kind == "causal", attn_mask=mask, scale=scale,
        )  # fmt: skip
        dq = _add(dq, part_dq.transpose(1, 2), rows, q.shape, acc)
        dk = _add(dk, _kv_grad(part_dk, heads_kv), keys, k.shape, acc)
        dv = _add(dv, _kv_grad(part_dv, heads_kv), keys, v.shape, acc)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc) if g is None else g
                  for g, x in ((dq, q), (dk, k), (dv, v)))  # fmt: skip
    return (dq.masked_fill(empty.transpose(1, 2)[..., None], 0.0) if blind else dq), dk, dv
