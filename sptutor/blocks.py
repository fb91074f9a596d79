"""The block math every sequence-parallel method is made of, written once in readable torch.

A method moves blocks of K and V (or states) between ranks; what each rank computes on them is one
of the functions here. The oracle's emulations and the real code's ``"torch"`` backend both call
them, so the two sides differ only in how blocks travel.

Softmax attention (see Design, *Conventions* and *Layering*):

- :func:`attention_block` — this rank's queries against one block of keys, masks from global
  positions, returning the block's output and log-sum-exp.
- :func:`merge` — the online-softmax merge of two partial results by their LSE.
- :func:`attention_block_backward` — the FlashAttention-2 backward of one block, given the *final*
  output and LSE of the rows (so block gradients simply add up).

Linear attention's chunk math (one chunk with its incoming and outgoing state) lives beside it in
``sptutor.chunks``, which takes :func:`accumulation_dtype` and :func:`group_query_heads` from here.

Blocks compute in float32 for 16-bit inputs and in float64 for float64 inputs (the accumulation
dtype); callers cast the final output back.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype of LSEs and accumulators."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_pairs(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which (query, key) pairs attend: (S_q, S_k) bool, from (position, document) pairs only.

    q_pos, q_doc: (S_q,); k_pos, k_doc: (S_k,). A query sees a key iff both lie in the same
    document, that document is not padding (id >= 0), and, when causal, ``k_pos <= q_pos``.
    Documents None mean one document holding every token.
    """
    if causal:
        visible = q_pos[:, None] >= k_pos[None, :]
    else:
        visible = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
    if q_doc is None and k_doc is None:
        return visible
    if q_doc is None or k_doc is None:
        raise ValueError("give document ids for both queries and keys, or for neither")
    same = (q_doc[:, None] == k_doc[None, :]) & (q_doc[:, None] >= 0)
    return visible & same


def any_visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> bool:
    """Does any query see any key? (a fully masked block need not be computed; shapes as
    :func:`visible_pairs`). O(S_q + S_k): per document, its latest query and its earliest key
    decide, so no S_q x S_k mask is built. Reads the answer to the host: call it on CPU tensors
    (:func:`visible_blocks`) to decide a loop's schedule before the loop."""
    if q_doc is None and k_doc is None:
        return not causal or bool(q_pos.max() >= k_pos.min())
    if q_doc is None or k_doc is None:
        raise ValueError("give document ids for both queries and keys, or for neither")
    q_real, k_real = q_doc >= 0, k_doc >= 0  # padding (id -1) sees nothing and is never seen
    if not (bool(q_real.any()) and bool(k_real.any())):
        return False
    documents = int(max(q_doc.max(), k_doc.max())) + 1
    none = torch.iinfo(torch.long).max  # a document without keys: its earliest key is "never"
    latest = torch.full((documents,), -1, dtype=torch.long, device=q_pos.device)
    latest = latest.scatter_reduce(0, q_doc[q_real].long(), q_pos[q_real].long(), "amax")
    earliest = torch.full((documents,), none, dtype=torch.long, device=k_pos.device)
    earliest = earliest.scatter_reduce(0, k_doc[k_real].long(), k_pos[k_real].long(), "amin")
    shared = (latest >= 0) & (earliest < none)  # documents holding a query and a key
    if not causal:
        return bool(shared.any())
    return bool((shared & (earliest <= latest)).any())


def visible_blocks(
    positions: list[torch.Tensor], documents: list[torch.Tensor | None], causal: bool
) -> list[list[bool]]:
    """Which blocks a method computes: ``table[i][j]`` is whether rank i's queries see any key
    of rank j's block (:func:`any_visible`). positions, documents: W x (S_j,) every rank's (ids,
    or W x None). Give CPU tensors: the methods decide their schedule once, on the host, before
    the first message, so no step waits on the device to learn whether to compute."""
    return [[any_visible(positions[i], positions[j], causal, documents[i], documents[j])
             for j in range(len(positions))] for i in range(len(positions))]  # fmt: skip


def group_query_heads(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, S, Hq, D) -> (B, S, Hkv, G, D): the G = Hq/Hkv query heads that share a K/V head."""
    batch, seq, heads_q, head_dim = x.shape
    return x.reshape(batch, seq, heads_kv, heads_q // heads_kv, head_dim)


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled scores of q: (B, S_q, Hq, D) against k: (B, S_k, Hkv, D), -inf where masked.

    Returns (B, Hkv, G, S_q, S_k) in the accumulation dtype, G = Hq/Hkv.
    """
    acc = accumulation_dtype(q.dtype)
    q_grouped = group_query_heads(q, k.shape[2]).to(acc)  # (B, S_q, Hkv, G, D)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_grouped, k.to(acc)) * scale
    return scores.masked_fill(~visible_pairs(q_pos, k_pos, causal, q_doc, k_doc), float("-inf"))


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(scores - lse)``: scores (B, Hkv, G, S_q, S_k), lse (B, Hq, S_q) -> probs like scores.

    Masked pairs get 0, and so do rows whose lse is -inf (they see no key).
    """
    batch, heads_kv, group, seq_q, _ = scores.shape
    lse = lse.reshape(batch, heads_kv, group, seq_q, 1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse)


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of some queries over one block of keys, in the accumulation dtype.

    q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D), Hq % Hkv == 0 (GQA without repeating K/V).
    q_pos: (S_q,), k_pos: (S_k,) global positions; causal masks pairs with q_pos < k_pos.
    q_doc: (S_q,), k_doc: (S_k,) document ids or None (one document): pairs in different
    documents, and padding (id -1), are masked too (:func:`visible_pairs`).
    Returns out: (B, S_q, Hq, D) and lse: (B, Hq, S_q); a row that sees no key of the block has
    out 0 and lse -inf, so :func:`merge` ignores it.
    """
    batch, seq_q, heads_q, head_dim = q.shape
    scores = _scores(q, k, q_pos, k_pos, causal, scale, q_doc, k_doc)  # (B, Hkv, G, S_q, S_k)
    lse = torch.logsumexp(scores, dim=-1).reshape(batch, heads_q, seq_q)  # (B, Hq, S_q)
    probs = _probabilities(scores, lse)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype))  # (B, S_q, Hkv, G, D)
    return out.reshape(batch, seq_q, heads_q, head_dim), lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets (online softmax).

    out, block_out: (B, S, Hq, D); lse, block_lse: (B, Hq, S). Each part is normalised over its own
    keys; the merged result is normalised over both:
    ``lse = log(e^lse + e^block_lse)`` and
    ``out = (e^lse·out + e^block_lse·block_out) / e^merged_lse``.
    Stable: everything is shifted by the larger LSE, and a part with lse -inf (no visible key)
    gets weight 0; if both are -inf the result is out 0, lse -inf.
    """
    # BEGIN SOLUTION merge: combine two partial results by their LSE, stably (online softmax)
    larger = torch.maximum(lse, block_lse)
    shift = torch.where(torch.isinf(larger), torch.zeros_like(larger), larger)
    weight, block_weight = torch.exp(lse - shift), torch.exp(block_lse - shift)  # in [0, 1]
    total = weight + block_weight  # in [1, 2], or 0 when both parts are empty
    merged_lse = shift + torch.log(total)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))

    def per_token(x: torch.Tensor) -> torch.Tensor:  # (B, Hq, S) -> (B, S, Hq, 1)
        return (x / safe_total).transpose(1, 2)[..., None]

    merged_out = per_token(weight) * out + per_token(block_weight) * block_out
    return merged_out, merged_lse
    # END SOLUTION


def attention_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    scale: float,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block, FlashAttention-2 form, in the accumulation dtype.

    dout, out: (B, S_q, Hq, D) gradient of and *final* output of the rows (over all keys);
    lse: (B, Hq, S_q) their final LSE; q: (B, S_q, Hq, D); k, v: (B, S_k, Hkv, D); positions
    and document ids as in :func:`attention_block`.
    With ``P = exp(S - lse)`` the block's share of the final softmax and
    ``delta = rowsum(dout * out)``: ``dV = P^T dout``, ``dS = P ⊙ (dout V^T - delta)``,
    ``dQ = scale·dS K``, ``dK = scale·dS^T Q``. Summing them over every block of keys gives the
    gradients of full attention. Returns dq: (B, S_q, Hq, D), dk, dv: (B, S_k, Hkv, D).
    """
    # BEGIN SOLUTION block backward: dV, dS, dQ, dK of one block, from the final out and LSE
    batch, seq_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    scores = _scores(q, k, q_pos, k_pos, causal, scale, q_doc, k_doc)
    probs = _probabilities(scores, lse)  # (B, Hkv, G, S_q, S_k)
    acc = probs.dtype
    dout_g = group_query_heads(dout, heads_kv).to(acc)  # (B, S_q, Hkv, G, D)
    delta = (dout_g * group_query_heads(out, heads_kv).to(acc)).sum(-1)  # (B, S_q, Hkv, G)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dout_g)  # (B, S_k, Hkv, D)
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dout_g, v.to(acc))
    dscores = probs * (dprobs - delta.permute(0, 2, 3, 1)[..., None])  # (B, Hkv, G, S_q, S_k)
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k.to(acc)) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, group_query_heads(q, heads_kv).to(acc)) * scale
    return dq.reshape(batch, seq_q, heads_q, head_dim), dk, dv
    # END SOLUTION
