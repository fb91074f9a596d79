"""Running under ``torchrun``: join the process group torchrun describes in the environment, with
NCCL and ``cuda:LOCAL_RANK`` when CUDA is available and gloo on CPU otherwise.

``torchrun --standalone --nproc_per_node 4 my_script.py`` starts the ranks and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; sptutor's entry points (the
checker, and the commands that take ``torchrun``) call :func:`init` and print from rank 0 only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Is this process one of torchrun's ranks (its environment is set)?"""
    return all(name in os.environ for name in ENVIRONMENT)


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> None:
    """Join torchrun's process group (once): NCCL on CUDA, gloo otherwise.

    A no-op when the group exists already (the caller made it); ``RuntimeError`` with what is
    missing when this process was not started by torchrun.
    """
    if dist.is_initialized():
        return
    if not launched():
        missing = [name for name in ENVIRONMENT if name not in os.environ]
        raise RuntimeError(
            f"not started by torchrun: {', '.join(missing)} unset; run it as `torchrun "
            "--standalone --nproc_per_node N ...`, or use sptutor.launch on CPU"
        )
    here = device()
    if here.type == "cuda":
        torch.cuda.set_device(here)
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo", device_id=(
        here if here.type == "cuda" else None))  # fmt: skip


def is_first() -> bool:
    """Rank 0 (or no process group at all): the one that prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def finish(code: int) -> int:
    """End this rank's part in the group and return ``code``, the exit code: every rank waits
    here until all have come (so rank 0 has printed: torchrun ends every rank as soon as one
    exits non-zero, which could cut rank 0 off mid-report), then leaves the group. A no-op
    without a group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code
