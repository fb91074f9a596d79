"""An SP × DP grid of processes and the gradient averaging that makes it train like one process.

The ``W = sp · dp`` ranks are laid out as LASP and USP lay them out: SP groups are ``sp``
contiguous ranks (``(0..sp-1), (sp..2sp-1), ...``: the talkative sequence-parallel traffic stays
among neighbours), DP groups are the strided ranks that hold the same piece of the sequence
(``(0, sp, 2sp, ...), (1, sp+1, ...), ...``). Every rank holds the whole model.

Each rank's loss is its tokens' share of its replica's mean (``sptutor.model.TinyGPT.forward``),
so the gradient of the replica's loss is the **sum** of its SP ranks' gradients, and the gradient of
the global batch is the **mean** over the DP replicas: :func:`average_gradients` does both, our
reading of LSS's "double gradient averaging" (``docs/training.md``). The same can be had from
torch's own data parallelism: :func:`wrap_ddp` and :func:`wrap_fsdp2`, then :func:`sum_over_sp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from sptutor import comm
from sptutor.mesh import UspMesh, make_usp_mesh


@dataclass(frozen=True)
class Grid:
    """This rank's place in the SP × DP grid and its process groups.

    ``sp_group``: the ``sp`` ranks that share one sequence; ``dp_group``: the ``dp`` ranks that
    hold the same piece of different sequences; ``mesh``: USP's Ulysses × ring split of the SP
    group (None unless made with ``ulysses``).
    """

    sp: int
    dp: int
    sp_rank: int
    dp_rank: int
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mesh: UspMesh | None = None


def make_grid(sp: int, dp: int, *, ulysses: int | None = None) -> Grid:
    """Split the default world into ``dp`` SP groups of ``sp`` contiguous ranks (and DP columns).

    Collective: every process calls it with the same arguments (torch needs every process to take
    part in creating each group). With ``ulysses=U`` each SP group is also split into a USP mesh of
    U-rank Ulysses rows and strided ring columns (``sptutor.mesh.make_usp_mesh``).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or dp < 1 or sp * dp != world:
        raise ValueError(
            f"the grid needs sp*dp == W with sp, dp >= 1, got sp={sp}, dp={dp}, W={world}"
        )
    sp_rows = [list(range(d * sp, (d + 1) * sp)) for d in range(dp)]  # contiguous
    dp_columns = [list(range(s, world, sp)) for s in range(sp)]  # strided
    sp_groups = [comm.new_group(row) for row in sp_rows]
    dp_groups = [comm.new_group(column) for column in dp_columns]
    dp_rank, sp_rank = divmod(rank, sp)
    # collective: every process takes part in every SP group's mesh, and keeps its own
    meshes = [make_usp_mesh(ulysses, sp // ulysses, g) if ulysses else None for g in sp_groups]
    return Grid(sp, dp, sp_rank, dp_rank, sp_groups[dp_rank], dp_groups[sp_rank], meshes[dp_rank])


def _all_reduce_in_place(tensors: list[torch.Tensor], group, divide_by: int = 1) -> None:
    """Sum ``tensors`` over ``group`` (then divide), as one flat bucket: one message, not one per
    tensor. Goes through ``sptutor.comm`` so the ledger sees gradient traffic too."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (total numel,)
    total = comm.all_reduce(flat, group, phase="backward") / divide_by
    for tensor, piece in zip(tensors, total.split([t.numel() for t in tensors])):
        tensor.copy_(piece.view_as(tensor))


def _local_grads(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter's gradient as this rank holds it (FSDP2's DTensor shard: its local part)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def average_gradients(model: nn.Module, grid: Grid) -> None:
    """Double gradient averaging: **sum** over the SP group, then **mean** over the DP group.

    Call after ``loss.backward()`` on every rank. Sum, because each SP rank's loss is its tokens'
    share of the replica mean (the shares add up to the mean); mean, because DP replicas each
    computed a full replica-mean gradient. Together: the gradient of the global-batch mean. (With
    packed documents every replica counts the same B·(S − N) targets, one packing for every row,
    so the replicas' means still weigh equally.)
    """
    with torch.no_grad():
        grads = _local_grads(model)
        _all_reduce_in_place(grads, grid.sp_group)
        _all_reduce_in_place(grads, grid.dp_group, divide_by=grid.dp)


def sum_over_sp(model: nn.Module, grid: Grid) -> None:
    """The SP half of :func:`average_gradients`, for use after DDP or FSDP2 averaged over DP.

    Both are linear, so the order does not matter. With FSDP2 over the DP group the SP peers of a
    rank hold the same shard (same DP rank), so summing local shards is summing gradients.
    """
    with torch.no_grad():
        _all_reduce_in_place(_local_grads(model), grid.sp_group)


def wrap_ddp(model: nn.Module, grid: Grid) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` over the DP group: it averages gradients over DP in backward
    (bucketed all-reduces overlapped with compute); call :func:`sum_over_sp` after backward."""
    return nn.parallel.DistributedDataParallel(model, process_group=grid.dp_group)


def wrap_fsdp2(model: nn.Module, grid: Grid, *, over: str = "dp") -> nn.Module:
    """FSDP2 (``fully_shard``): parameters sharded over the DP group, or over all W = SP × DP ranks.

    ``over="dp"``: gradients are reduce-scattered and averaged over DP; call :func:`sum_over_sp`
    after backward. ``over="world"``: shard over all W ranks (USP's advice: ZeRO over SP × DP) and
    divide the reduce-scattered sum by ``dp`` instead of W, which is the whole double averaging in
    one collective; nothing to call after backward. ``model`` is changed in place and returned.
    """
    from torch.distributed.fsdp import fully_shard

    if over not in ("dp", "world"):
        raise ValueError(f"over must be 'dp' or 'world', got {over!r}")
    group = grid.dp_group if over == "dp" else dist.group.WORLD
    device_type = next(model.parameters()).device.type
    fully_shard(model, mesh=DeviceMesh.from_group(group, device_type))
    if over == "world":
        model.set_gradient_divide_factor(float(grid.dp))
    return model
