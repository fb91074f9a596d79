"""``sptutor bench time`` under torchrun: the methods timed on the ranks torchrun started.

    torchrun --standalone --nproc_per_node 4 -m sptutor.bench time

W = ``WORLD_SIZE``; every rank joins torchrun's group (:func:`sptutor.torchrun.init`: NCCL and
``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU) and runs :func:`sptutor.bench.timing.on_rank` on its
device, every repeat from barrier to barrier with ``torch.cuda.synchronize`` around the call on a
GPU (CUDA calls return before the GPU has finished). Then rank 0 alone times the single-process
reference on its own device while the others wait at a barrier, and prints the one table; the
other ranks print nothing.

On the CPU each rank runs one intra-op thread and the reference W threads, capped at the cores
(as without torchrun: the same cores on both sides). On GPUs the reference is one GPU (rank 0's),
so there a ratio is time on W GPUs / time on one: 1/W would be perfect scaling.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from sptutor import console, torchrun
from sptutor.bench import timing


def measure(quick: bool = False) -> list[dict] | None:
    """Rows (``timing.rows``) for W = torchrun's world size on rank 0; None on the other ranks.
    Joins torchrun's group if needed (every rank must call this)."""
    torchrun.init()
    sizes, repeats = timing.shape(quick), timing.repeat_count(quick)
    rank, world, device = dist.get_rank(), dist.get_world_size(), torchrun.device()
    on_cpu = device.type == "cpu"
    first = rank == 0
    threads = torch.get_num_threads()
    progress = console.progress(2, "bench time") if first else nullcontext(lambda label: None)
    with progress as done:
        if on_cpu:
            torch.set_num_threads(1)  # as sptutor.launch's ranks: W processes share the cores
        try:
            mine = timing.on_rank(rank, world, sizes, repeats, device)
        finally:
            torch.set_num_threads(threads)
        done(f"{world} rank{'s' if world > 1 else ''} on {device.type}")
        reference = None
        if first:
            count = timing.reference_threads(world) if on_cpu else threads
            reference = timing.single(sizes, repeats, count, device)
            done(f"one process on {device.type}")
        dist.barrier()  # the others wait here while rank 0 times the reference
    if not first:
        return None
    return timing.rows({world: reference}, {world: count if on_cpu else None}, {world: mine},
                       not quick)  # fmt: skip


def run(out: Path | None = None, quick: bool = False) -> int:
    """Time on torchrun's ranks; rank 0 prints the table (and writes ``out``), the rest nothing."""
    made = not dist.is_initialized()
    torchrun.init()
    try:
        sizes, world, device = timing.shape(quick), dist.get_world_size(), torchrun.device()
        first = dist.get_rank() == 0
        if first:
            where = ("one NCCL rank per GPU" if device.type == "cuda"
                     else "one thread per gloo rank")  # fmt: skip
            timing.header(sizes, quick, f"torchrun, W={world}, {where}")
        measured = measure(quick)
        if first:
            timing.show(measured, sizes, out, notes=_notes(device, world))
    finally:
        if made:
            dist.destroy_process_group()
    return 0


def _notes(device: torch.device, world: int) -> tuple[str, ...]:
    """What the ratio means on this device, and the goal."""
    if device.type == "cuda":
        meaning = (f"ratio: time on {world} GPUs (NCCL, torchrun's ranks) / time on one GPU "
                   f"(rank 0's) with the whole sequence; 1/{world} = perfect scaling.")  # fmt: skip
    else:
        meaning = (f"ratio: time on {world} gloo ranks (1 thread each) / time of rank 0 alone "
                   f"with the whole sequence on min(W, {timing.cores()}) threads (the same "
                   "cores); 1 = splitting costs nothing.")  # fmt: skip
    return (
        meaning,
        f"goal (stated for W=4): each method but rsa within {timing.GOAL}x; 'meets' "
        f"is computed from the W={world} ratio; lasp, lasp2 against chunks.intra_blocked.",
        "times move with the machine's load: judged, never asserted.",
    )
