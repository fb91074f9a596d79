"""Adapter for the official LASP package (linear attention sequence parallelism, Sun et al. 2024).

lasp 0.0.1 (https://github.com/OpenNLPLab/LASP), as ``sptutor.testing.check`` calls it:
``attention(q, k, v, slope=...)`` on every rank with this rank's shards.

- layout "bhsd": q, k, v (B, H, S/W, D), one head count (the adapter repeats K/V heads for GQA).
- causal only, no softmax, no scale, no normalisation: ``o_i = sum_{j<=i} exp(-s (i-j)) (q_i . k_j)
  v_j`` with the slope s of each head, the same as sptutor's linear attention with decay exp(-s).
- float32; float64 raises in naive and cache, runs in float32 in fuse; local shapes: ``LIMITS``.
- group: LASP reads a global (``seq_parallel_manager._SEQUENCE_PARALLEL_GROUP``), set by ``setup``;
  its neighbours are global rank -/+ 1, so the group must be consecutive ranks (the first W are).
- tokens: contiguous (rank r sends its prefix state to rank r + 1).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch
import torch.distributed as dist


def use_cpu_workarounds() -> None:
    """CPU workarounds, needed before lasp is imported when there is no GPU.

    - TRITON_INTERPRET=1 runs its Triton kernels in the interpreter; triton reads it when it is
      first imported, so it must be set before anything imports triton (yunchang does).
    - ``torch.cuda.device(None)`` (lasp enters ``torch.cuda.device(q.device.index)`` around every
      kernel) raises on CPU tensors: make it a null context.
    """
    if torch.cuda.is_available():
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "lasp on CPU needs TRITON_INTERPRET=1, read when triton is first imported, but triton "
            "is imported already: set it in the environment before Python starts"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    torch.cuda.device = lambda index: contextlib.nullcontext()


use_cpu_workarounds()

import lasp  # noqa: E402  (after the workarounds: its kernels are compiled when it is imported)
from lasp.utils import seq_parallel_manager  # noqa: E402

# What the kernels need of the local shard (S/W tokens, head dim D), by entry point; outside these
# lasp returns wrong numbers without an error (the output is torch.empty, left partly unwritten).
LIMITS = {
    "lasp_naive": "S/W % 64 == 0 and D % 32 == 0",
    "lasp_cache": "S/W % 64 == 0 and D % 32 == 0",
    "lasp_fuse": "S/W % 64 == 0, B > 1 and H > 1 (it squeezes every size-1 dim of its output)",
    "lasp_fuse_parallel": "S/W <= 128 and a power of 2, or S/W % 256 == 0",
}


class _BarrierInGroup:
    """torch.distributed as lasp_fuse_parallel sees it: its ``dist.barrier()`` has no group, so a
    case on the first W ranks of a larger launch would wait there for the ranks outside it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def __getattr__(self, name: str):
        return getattr(dist, name)


def setup(ctx) -> dict:
    """Point LASP's sequence-parallel group (a module global) at this case's group."""
    if ctx.rank is not None:
        seq_parallel_manager._SEQUENCE_PARALLEL_GROUP = ctx.group
        importlib.import_module("lasp.lasp_fuse_parallel").dist = _BarrierInGroup(ctx.group)
    return {}


def attention(q, k, v, *, slope: torch.Tensor, entry: str = "lasp_naive") -> torch.Tensor:
    """q: (B, H, S/W, D), k, v: (B, Hkv, S/W, D) this rank's shards, slope: (H,) with
    decay = exp(-slope) -> out (B, H, S/W, D)."""
    B, H, S_loc, D = q.shape
    k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))  # (B, H, S/W, D)
    slope = slope.to(torch.float32).reshape(H, 1, 1)  # lasp's s: (H, 1, 1)
    if entry == "lasp_naive":
        return lasp.lasp_naive(q, k, v, slope)
    states = [torch.zeros(B, H, D, D, dtype=torch.float32) for _ in range(2)]  # KV, DKV buffers
    if entry == "lasp_cache":
        return lasp.lasp_cache(q, k, v, slope, torch.arange(S_loc).to(q), *states)
    return getattr(lasp, entry)(q, k, v, slope, *states)


ADAPTER = dict(
    method="lasp",
    tensor_layout="bhsd",
    causal_keyword=None,  # causal only: nothing to pass
    group_keyword=None,  # lasp reads its group from seq_parallel_manager, set by setup
    returns="out",
    decay="slope",  # decay = exp(-slope)
    decay_keyword="slope",
    positions=None,  # sptutor's contiguous layout
    setup=setup,
    kwargs={},
)

# What every check of lasp draws: local shards inside every entry point's limits (S/W = 64,
# D = 32, B = 2), causal with a per-head decay (lasp always takes a slope).
SWEEP = dict(per_rank=(64,), head_dims=(32,), batches=(2,), heads_kv=(1, 2), gqa=(1, 2),
             decays=(True,))  # fmt: skip

# What is worth checking: check() options per configuration, merged over ADAPTER and SWEEP
# (kwargs merged into ADAPTER's). naive and cache raise on float64; fuse and fuse_parallel take it.
CONFIGS = [
    dict(name="lasp_naive", dtypes=("float32",), kwargs=dict(entry="lasp_naive")),
    dict(name="lasp_cache", dtypes=("float32",), kwargs=dict(entry="lasp_cache")),
    dict(name="lasp_fuse", dtypes=("float32", "float64"), kwargs=dict(entry="lasp_fuse")),
    dict(name="lasp_fuse_parallel", dtypes=("float32", "float64"),
         kwargs=dict(entry="lasp_fuse_parallel")),
    # just outside the documented limits: S/W = 32 for naive, 96 for fuse_parallel
    dict(name="lasp_naive, S/W = 32", dtypes=("float32",), per_rank=(32,),
         kwargs=dict(entry="lasp_naive")),
    dict(name="lasp_fuse_parallel, S/W = 96", dtypes=("float32",), per_rank=(96,),
         kwargs=dict(entry="lasp_fuse_parallel")),
]  # fmt: skip
