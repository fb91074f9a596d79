"""The heads layout of Ulysses (and of USP's ulysses groups), shared by oracle and real code.

After the sequence -> heads all-to-all over U ranks, each rank holds H/U heads of the tokens of its
whole group. Fewer K/V heads than ranks (``U % Hkv == 0``, e.g. MQA) are replicated U/Hkv times
before that all-to-all, and their gradients summed after the one back.
"""

from __future__ import annotations

import torch

from sptutor import blocks


def replicas(heads_kv: int, degree: int) -> int:
    """How many copies of each K/V head go on the wire over ``degree`` = U ranks: U/Hkv when
    Hkv < U, else 1."""
    return max(1, degree // heads_kv)


def sum_replicas(x: torch.Tensor, replicas: int) -> torch.Tensor:
    """x: (B, S_r, Hkv·rep, D) -> (B, S_r, Hkv, D): the gradient of a replicated head is the sum
    over its replicas, added in the accumulation dtype."""
    B, S_local, H, D = x.shape
    acc = blocks.accumulation_dtype(x.dtype)
    # (B, S_r, Hkv·rep, D) -> (B, S_r, Hkv, rep, D) -> (B, S_r, Hkv, D)
    return x.reshape(B, S_local, H // replicas, replicas, D).sum(dim=3, dtype=acc).to(x.dtype)


def gathered_positions(positions: list[torch.Tensor], degree: int) -> list[torch.Tensor]:
    """positions: W x (S_r,) every rank's, ``rank = ring_index·U + ulysses_index``.

    Returns R x (T_i,): the tokens each ulysses group of ``degree`` = U ranks holds after its
    sequence -> heads all-to-all (padding dropped, ``sptutor.padding``), its ranks' positions
    concatenated in rank order (under USP's layout: the T_i tokens ring rank i owns).
    """
    return [torch.cat(positions[i : i + degree]) for i in range(0, len(positions), degree)]


def gathered_documents(
    documents: list[torch.Tensor | None], degree: int
) -> list[torch.Tensor | None]:
    """documents: W x (S_r,) every rank's document ids, or W x None (one document).

    Returns R x (T_i,), as :func:`gathered_positions` gathers positions, or R x None.
    """
    if documents[0] is None:
        return [None] * (len(documents) // degree)
    return gathered_positions(documents, degree)


def gathered_visibility(visible: list[list[bool]], degree: int) -> list[list[bool]]:
    """visible: W x W, ``visible[a][b]`` whether rank a's queries see any key of rank b's
    (``sptutor.blocks.visible_blocks``). Returns R x R for the ring over the ulysses groups of
    ``degree`` = U contiguous ranks (:func:`gathered_positions`): ring rank i sees ring rank j's
    block iff some rank of group i sees some rank of group j."""
    groups = [range(i, i + degree) for i in range(0, len(visible), degree)]
    return [[any(visible[a][b] for a in mine for b in theirs) for theirs in groups]
            for mine in groups]  # fmt: skip


def group_sizes(positions: list[torch.Tensor], degree: int) -> list[list[int]]:
    """positions: W x (S_r,) every rank's. Returns R lists of U shard lengths: those of each
    ulysses group of ``degree`` = U contiguous ranks, in rank order (what its all-to-alls pad to
    their largest, ``sptutor.padding``)."""
    lengths = [len(p) for p in positions]
    return [lengths[i : i + degree] for i in range(0, len(lengths), degree)]
