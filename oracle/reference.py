"""The ground truth: full-matrix attention and full-matrix linear attention, nothing clever.

Written independently of ``sptutor.blocks`` on purpose: every block primitive, oracle method, real
method and kernel is compared against these two functions.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from sptutor.checks import check_decay, check_positions, check_qkv
from sptutor.layout import check_cu_seqlens


def _positions(pos: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device) if pos is None else pos.to(device)


def _same_document(cu_seqlens, q_pos, k_pos, seq_len=None) -> torch.Tensor | None:
    """(S_q, S_k) bool: both tokens in one document of ``cu_seqlens`` (None: no documents).

    Written out with a loop over the documents, not with ``sptutor.layout.document_ids``, so the
    ground truth does not lean on the code it checks."""
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, seq_len)
    offsets = cu_seqlens.tolist()
    if int(max(q_pos.max(), k_pos.max())) >= offsets[-1]:
        raise ValueError(
            f"positions must lie inside the documents of cu_seqlens (0..{offsets[-1] - 1}), "
            f"got up to {int(max(q_pos.max(), k_pos.max()))}"
        )
    same = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    for start, end in pairwise(offsets):
        q_in = (q_pos >= start) & (q_pos < end)
        k_in = (k_pos >= start) & (k_pos < end)
        same |= q_in[:, None] & k_in[None, :]
    return same


def _broadcast_kv_heads(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Repeat each K/V head for the query heads that share it (GQA/MQA): (B, S, Hq, D)."""
    return kv.repeat_interleave(q.shape[2] // kv.shape[2], dim=2)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (B, S, H, D) tensors over a full score matrix, in the inputs' dtype.

    q: (B, S_q, Hq, D) queries; k, v: (B, S_k, Hkv, D) keys and values, Hq % Hkv == 0.
    q_pos: (S_q,), k_pos: (S_k,) global positions (default arange); with ``causal`` the query at
    position i sees the keys at positions j <= i. ``scale`` defaults to D ** -0.5.
    ``cu_seqlens``: (N+1,) offsets of packed documents over the global sequence (0 first, the
    sequence length last, which must cover every position): a query sees only keys of its own
    document. None: one document.
    Returns out: (B, S_q, Hq, D) and lse: (B, Hq, S_q), the natural log of the sum of exp of each
    score row,
    float32 (float64 for float64 inputs). A row that sees no key has out 0 and lse -inf.
    """
    check_qkv(q, k, v, same_length=False)
    check_positions(q_pos, q.shape[1], "q_pos")
    check_positions(k_pos, k.shape[1], "k_pos")
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    k, v = _broadcast_kv_heads(q, k), _broadcast_kv_heads(q, v)  # (B, S_k, Hq, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, Hq, S_q, S_k)
    q_pos = _positions(q_pos, q.shape[1], q.device)
    k_pos = _positions(k_pos, k.shape[1], q.device)
    visible = (
        q_pos[:, None] >= k_pos[None, :]
        if causal
        else torch.ones_like(scores[0, 0], dtype=torch.bool)
    )
    same = _same_document(cu_seqlens, q_pos, k_pos)
    if same is not None:
        visible = visible & same
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S_q), -inf on rows that see nothing
    sees_a_key = visible.any(dim=-1, keepdim=True)  # (S_q, 1)
    probs = torch.softmax(scores.masked_fill(~sees_a_key, 0.0), dim=-1) * sees_a_key
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, S_q, Hq, D)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def full_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    decay: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised linear attention of (B, S, H, D) tensors over a full (S x S) weight matrix.

    q: (B, S, Hq, D); k, v: (B, S, Hkv, D), broadcast to the query heads.
    Causal: ``o_i = sum_{j<=i} decay^(i-j) (q_i . k_j) v_j`` with ``decay: (Hq,)`` in (0, 1] or None
    (= 1). Non-causal: ``o_i = sum_j (q_i . k_j) v_j`` (decay not allowed).
    ``cu_seqlens``: (N+1,) offsets of packed documents: the sums run over j in i's document only
    (the state starts afresh at every document). Returns out: (B, S, Hq, D).
    """
    check_qkv(q, k, v, same_length=causal)  # causal: i and j index one sequence
    check_decay(decay, q, causal)
    seq_len, heads_q = q.shape[1], q.shape[2]
    k, v = _broadcast_kv_heads(q, k), _broadcast_kv_heads(q, v)  # (B, S, Hq, D)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k)  # (B, Hq, S, S)
    if causal:
        pos = torch.arange(seq_len, device=q.device)
        distance = pos[:, None] - pos[None, :]  # (S, S): i - j
        rates = (
            torch.ones(heads_q, dtype=q.dtype, device=q.device) if decay is None else decay.to(q)
        )
        powers = rates[:, None, None] ** distance.clamp(min=0)  # (Hq, S, S): decay^(i-j)
        weights = weights * torch.where(distance >= 0, powers, torch.zeros_like(powers))
    pos = torch.arange(seq_len, device=q.device)
    same = _same_document(cu_seqlens, pos, torch.arange(k.shape[1], device=q.device), seq_len)
    if same is not None:
        weights = weights * same
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, S, Hq, D)
