"""The 2-D process mesh of USP (Fang & Zhao 2024): Ulysses inside, ring outside.

The W = U·R ranks of a group are laid out as R rows of U: Ulysses groups are U contiguous ranks
(``rank = ring_index * U + ulysses_index``, the high-bandwidth all-to-all stays among neighbours,
e.g. inside a node) and ring groups are the strided ranks that share an ulysses index. This is the
layout of ``sptutor.layout`` with ``ulysses=U`` and of the USP paper's ``set_seq_parallel_pg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from sptutor import comm


@dataclass(frozen=True)
class UspMesh:
    """This rank's two process groups and the mesh's degrees.

    ``ulysses_group`` holds the U ranks this rank does all-to-alls with; ``ring_group`` the R
    ranks it passes K, V blocks around with; ``group`` the whole mesh (None = default group).
    """

    ulysses: int
    ring: int
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    group: dist.ProcessGroup | None = None

    @property
    def world(self) -> int:
        """W = U·R, the number of ranks in the mesh."""
        return self.ulysses * self.ring


def check_mesh_sizes(ulysses: int, ring: int, world: int) -> None:
    """Raise ``ValueError`` unless ``U·R == W`` with both degrees >= 1."""
    if ulysses < 1 or ring < 1 or ulysses * ring != world:
        raise ValueError(f"usp needs U*R == W with U, R >= 1, got U={ulysses}, R={ring}, W={world}")


def _members(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` in group-rank order, on every process of the world.

    A process outside ``group`` holds only torch's placeholder handle (``NON_GROUP_MEMBER``), which
    cannot name the group's ranks (``get_process_group_ranks`` answers with another group's), so
    every process tells the others its rank in ``group``, -1 outside it: one all-gather.
    """
    if group is None:
        return list(range(dist.get_world_size()))
    group_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(group_ranks, dist.get_rank(group))
    return [rank for _, rank in sorted((g, r) for r, g in enumerate(group_ranks) if g >= 0)]


def make_usp_mesh(
    ulysses: int, ring: int, group: dist.ProcessGroup | None = None
) -> UspMesh | None:
    """Split ``group`` (default: the whole world) into Ulysses rows and ring columns.

    Collective over the default world: every process calls it with the same arguments (torch
    needs every process to take part in creating each new group). Returns this rank's mesh, or
    None on a process outside ``group``.
    """
    members = _members(group)  # global ranks, in group-rank order
    check_mesh_sizes(ulysses, ring, len(members))
    rows = [members[i * ulysses : (i + 1) * ulysses] for i in range(ring)]  # contiguous ranks
    columns = [members[j::ulysses] for j in range(ulysses)]  # strided ranks
    row_groups = [comm.new_group(row) for row in rows]
    column_groups = [comm.new_group(column) for column in columns]
    me = dist.get_rank()
    if me not in members:
        return None
    ulysses_group = next(g for row, g in zip(rows, row_groups) if me in row)
    ring_group = next(g for column, g in zip(columns, column_groups) if me in column)
    return UspMesh(ulysses, ring, ulysses_group, ring_group, group)
