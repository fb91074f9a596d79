"""The ground truth: full-matrix attention and full-matrix linear attention, nothing clever.

Written independently of ``sptutor.blocks`` on purpose: every block primitive, oracle method, real
method and kernel is compared against these two functions.
"""

from __future__ import annotations

import torch

from sptutor.checks import check_decay, check_positions, check_qkv


def _positions(pos: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device) if pos is None else pos.to(device)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (B, S, H, D) tensors over a full score matrix, in the inputs' dtype.

    q: (B, S_q, Hq, D) queries; k, v: (B, S_k, Hkv, D) keys and values, Hq % Hkv == 0.
    q_pos: (S_q,), k_pos: (S_k,) global positions (default arange); with ``causal`` the query at
    position i sees the keys at positions j <= i. ``scale`` defaults to D ** -0.5.
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
) -> torch.Tensor:
    """Unnormalised linear attention of (B, S, H, D) tensors over a full (S x S) weight matrix.

    q: (B, S, Hq, D); k, v: (B, S, Hkv, D), broadcast to the query heads.
    Causal: ``o_i = sum_{j<=i} decay^(i-j) (q_i . k_j) v_j`` with ``decay: (Hq,)`` in (0, 1] or None
    (= 1). Non-causal: ``o_i = sum_j (q_i . k_j) v_j`` (decay not allowed).
    Returns out: (B, S, Hq, D).
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
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, S, Hq, D)
