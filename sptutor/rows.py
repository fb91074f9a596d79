"""Full score rows, the maths of Ring Self-Attention: a rank's queries against the whole sequence.

RSA keeps, on each rank, the scores of its S_r queries against all S keys, ``(B, Hq, S_r, S)``,
filled block by block as K travels the ring (no online softmax). The oracle's emulation and the
real code both call these functions, so the two sides differ only in how blocks travel.

``block(src)``, the columns of rank src's keys, is ``sptutor.padding.spans`` of the blocks'
sizes (shards may differ by a token); the products compute in the accumulation dtype
(:func:`sptutor.blocks.accumulation_dtype`), one einsum per block.
"""

from __future__ import annotations

import torch

from sptutor import blocks


def _rows_by_kv_head(rows: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, Hq, S_q, S_k) -> (B, Hkv, G, S_q, S_k): score rows grouped by the K/V head they use."""
    batch, heads_q, seq_q, seq_k = rows.shape
    return rows.reshape(batch, heads_kv, heads_q // heads_kv, seq_q, seq_k)


def _rows_against(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``x·block^T`` per head: x (B, S_q, Hq, D), block (B, S_k, Hkv, D) -> (B, Hq, S_q, S_k).

    In the accumulation dtype of ``x``.
    """
    batch, seq_q, heads_q, _ = x.shape
    acc = blocks.accumulation_dtype(x.dtype)
    # (B, S_q, Hq, D) -> (B, S_q, Hkv, G, D)
    x_grouped = blocks.group_query_heads(x, block.shape[2]).to(acc)
    product = torch.einsum("bqhgd,bkhd->bhgqk", x_grouped, block.to(acc))
    return product.reshape(batch, heads_q, seq_q, block.shape[1])  # (B, Hq, S_q, S_k)


def scores_block(
    q, k_block, q_pos, k_pos, causal: bool, scale: float, q_doc=None, k_doc=None
) -> torch.Tensor:
    """``scale·q·k_src^T``, -inf where masked: q (B, S_q, Hq, D), k_block (B, S_k, Hkv, D),
    q_pos, q_doc (S_q,), k_pos, k_doc (S_k,) (documents None: one document; masks as
    ``blocks.visible_pairs``) -> (B, Hq, S_q, S_k) in the accumulation dtype."""
    visible = blocks.visible_pairs(q_pos, k_pos, causal, q_doc, k_doc)  # (S_q, S_k)
    return (_rows_against(q, k_block) * scale).masked_fill(~visible, float("-inf"))


def softmax(scores: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over full rows: scores (B, Hq, S/W, S) -> lse (B, Hq, S/W) and P in ``dtype``.

    A row that sees no key has lse -inf and P 0.
    """
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S/W)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(scores - finite_lse[..., None]).to(dtype)


def weighted_block(weights: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``weights·block`` per head: ``P[:, :, block(src)]·v_src`` forward (paper eq. 4),
    ``dS[:, :, block(src)]·k_src`` backward.

    weights: (B, Hq, S_q, S_k); block: (B, S_k, Hkv, D). Returns (B, S_q, Hq, D) in the
    accumulation dtype of ``block``.
    """
    batch, heads_q, seq_q, _ = weights.shape
    acc = blocks.accumulation_dtype(block.dtype)
    weights_grouped = _rows_by_kv_head(weights, block.shape[2]).to(acc)  # (B, Hkv, G, S_q, S_k)
    product = torch.einsum("bhgqk,bkhd->bqhgd", weights_grouped, block.to(acc))
    return product.reshape(batch, seq_q, heads_q, block.shape[3])  # (B, S_q, Hq, D)


def dprobs_block(dout: torch.Tensor, v_block: torch.Tensor) -> torch.Tensor:
    """``dP[:, :, block(src)] = dO·v_src^T``: dout (B, S_q, Hq, D), v_block (B, S_k, Hkv, D)
    -> (B, Hq, S_q, S_k) in the accumulation dtype."""
    return _rows_against(dout, v_block)


def softmax_backward(probs: torch.Tensor, dprobs: torch.Tensor) -> torch.Tensor:
    """``dS = P ⊙ (dP - rowsum(P ⊙ dP))``, the softmax Jacobian on full rows (B, Hq, S/W, S)."""
    probs = probs.to(dprobs.dtype)
    return probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))


def key_gradient_share(weights: torch.Tensor, x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``weights^T·x``: this rank's queries' share of the gradient of every key (or value).

    weights: (B, Hq, S/W, S) (P for dV, dS for dK); x: (B, S/W, Hq, D) (dout for dV, q for dK).
    Summed over the query heads of each K/V head: returns (B, S, Hkv, D) in the accumulation
    dtype of ``x``.
    """
    acc = blocks.accumulation_dtype(x.dtype)
    x_grouped = blocks.group_query_heads(x, heads_kv).to(acc)  # (B, S/W, Hkv, G, D)
    weights_grouped = _rows_by_kv_head(weights, heads_kv).to(acc)  # (B, Hkv, G, S/W, S)
    return torch.einsum("bhgqk,bqhgd->bkhd", weights_grouped, x_grouped)  # (B, S, Hkv, D)
