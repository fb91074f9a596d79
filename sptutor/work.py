"""Useful work: the multiply-adds each block of a method really needs, masked pairs excluded.

The oracle logs one ``compute`` event per block it computes, with these counts, so that load
balance is visible in the ledger (contiguous causal gives the last rank most of the work, zigzag
gives every rank the same). The counts are of useful work only: a tile a kernel computes and then
masks is not counted.
"""

from __future__ import annotations

import torch

from sptutor.blocks import visible_pairs

# multiply-adds per token and per D² of each product of a chunk with a state (see linear_macs)
_STATE_PRODUCTS = {
    "readout": 1,  # q_i KV
    "local_state": 1,  # k_i^T v_i
    "readout_backward": 1,  # dO_i KV^T
    "local_dstate": 1,  # q_i^T dO_i
    "local_state_backward": 2,  # v_i dKV^T and k_i dKV
}


def attention_macs(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    batch: int,
    heads_q: int,
    head_dim: int,
    *,
    backward: bool = False,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> int:
    """Useful multiply-adds of one block: per visible (query, key) pair and head, 2·D forward
    (the score q·k, then p·v) and 5·D backward (the score again, dV, dP, dQ and dK).

    q_pos, q_doc: (S_q,); k_pos, k_doc: (S_k,); pairs across documents (or with padding) are
    masked, hence not useful work.
    """
    pairs = int(visible_pairs(q_pos, k_pos, causal, q_doc, k_doc).sum())
    return (5 if backward else 2) * batch * heads_q * head_dim * pairs


def linear_macs(part: str, batch: int, heads_q: int, length: int, head_dim: int) -> int:
    """Useful multiply-adds of one piece of a chunk of C = ``length`` tokens, over B and Hq.

    ``"intra"``: 2·D per visible pair (q·k, then ·v), C(C+1)/2 pairs; ``"intra_backward"``: 5·D
    per pair (the weights again, dV, dA, dQ, dK), as :func:`attention_macs` counts softmax.
    A product of the chunk with a state costs C·D²: ``"readout"``, ``"local_state"``,
    ``"readout_backward"``, ``"local_dstate"`` one each, ``"local_state_backward"`` two (dk, dv).
    The D×D additions of the chain step (``decay^C·state + local``) are elementwise and not
    counted.
    """
    if part in ("intra", "intra_backward"):
        per_pair = 2 if part == "intra" else 5
        return per_pair * batch * heads_q * head_dim * length * (length + 1) // 2
    if part not in _STATE_PRODUCTS:
        raise ValueError(
            f"part must be intra, intra_backward or one of {tuple(_STATE_PRODUCTS)}, got {part!r}"
        )
    return _STATE_PRODUCTS[part] * batch * heads_q * length * head_dim**2
