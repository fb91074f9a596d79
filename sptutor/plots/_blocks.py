"""The K/V blocks of a ring-family call (rsa, ring, lss, usp), read from its ledger and masks.

A *block* is one rank's keys and values: rank r computes its queries against block b when its
ledger holds a forward compute event with ``block == b``. Under USP rank r attends its whole
ulysses group's queries (for Hq/U heads) against the blocks of its ring group (``b % U == r % U``),
each block its owner's ulysses group's tokens. A block is *skipped* when the method never computes
it: none of its (query, key) pairs is visible, because of the causal mask or because no query
shares a document with any key (packed documents, ``sim.cu_seqlens``).

Nothing here draws; ``sptutor trace`` prints the same facts the pictures show.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from sptutor import blocks, layout

BLOCK_METHODS = ("rsa", "ring", "lss", "usp")
REASONS = {
    "causal": "causal: every key after every query",
    "documents": "documents: each causal pair spans two",
    "not computed": "not computed (although visible)",
}


def group_tokens(sim: Any, rank: int) -> np.ndarray:
    """(S_group,) the global positions of ``rank``'s ulysses group (its own when U = 1): the keys
    of its K/V block, and the queries it attends after Ulysses' all-to-all."""
    first = rank // sim.ulysses * sim.ulysses
    return np.concatenate([sim.positions[r].numpy() for r in range(first, first + sim.ulysses)])


def candidates(sim: Any) -> list[tuple[int, int]]:
    """Every (query rank, block) the method could compute: all pairs of its ring group."""
    world, degree = sim.world, sim.ulysses
    return [(r, b) for r in range(world) for b in range(world) if b % degree == r % degree]


def forward_steps(sim: Any) -> dict[tuple[int, int], list[int]]:
    """(rank, block) -> the sorted distinct steps of rank's forward compute events on block."""
    found: dict[tuple[int, int], set[int]] = defaultdict(set)
    for event in sim.ledger.events:
        if event.op == "compute" and event.phase == "forward" and event.block is not None:
            found[(event.rank, event.block)].add(event.step)
    return {key: sorted(steps) for key, steps in found.items()}


def forward_macs(sim: Any) -> dict[tuple[int, int], int]:
    """(rank, block) -> the useful MACs of rank's forward compute events on block (only the
    blocks it computes)."""
    found: dict[tuple[int, int], int] = defaultdict(int)
    for event in sim.ledger.events:
        if event.op == "compute" and event.phase == "forward" and event.block is not None:
            found[(event.rank, event.block)] += event.macs
    return dict(found)


def skipped(sim: Any) -> list[tuple[int, int]]:
    """The (rank, block) pairs of :func:`candidates` without a forward compute event, sorted."""
    computed = forward_macs(sim)
    return [pair for pair in candidates(sim) if pair not in computed]


def visible(sim: Any, queries: np.ndarray, keys: np.ndarray, *, by_document: bool = True):
    """(len(queries), len(keys)) bool: which pairs of these global positions attend, under the
    call's causal mask and (``by_document``) its documents (``blocks.visible_pairs``)."""
    q_pos, k_pos = torch.as_tensor(queries), torch.as_tensor(keys)
    q_doc = k_doc = None
    offsets = getattr(sim, "cu_seqlens", None)
    if by_document and offsets is not None:
        q_doc, k_doc = layout.document_ids(offsets, q_pos), layout.document_ids(offsets, k_pos)
    return blocks.visible_pairs(q_pos, k_pos, sim.causal, q_doc, k_doc).numpy()


def skip_reason(sim: Any, rank: int, block: int) -> str:
    """Why ``rank`` does not compute ``block``: ``"causal"`` (no visible pair even in one
    document), ``"documents"`` (pairs the causal mask leaves lie in different documents), or
    ``"not computed"`` (some pair is visible: a method that skips it is wrong)."""
    queries, keys = group_tokens(sim, rank), group_tokens(sim, block)
    if not visible(sim, queries, keys, by_document=False).any():
        return "causal"
    if not visible(sim, queries, keys).any():
        return "documents"
    return "not computed"
