"""``sptutor bench time``: wall time of every real method on 1, 2 and 4 gloo processes, as a
ratio to one process doing the same work without splitting it.

The single-process reference is PyTorch's fused attention
(``torch.nn.functional.scaled_dot_product_attention``) for the softmax methods, and the chunked
form the linear methods are built from for lasp and lasp2: :func:`sptutor.chunks.intra_blocked`,
the whole sequence as a chain of sub-chunks carrying the D×D state, as one LASP rank computes its
chunk. Every call is causal, forward + backward, on one intra-op thread per process (W processes
share this machine's cores); softmax methods use the zigzag layout, lasp and lasp2 contiguous.
Each figure is the median of a few repeats after a warm-up; a distributed repeat runs from one
barrier to the next, so it is the slowest rank's time. Times are printed, never checked: on a
CPU the processes share cores and memory, so a ratio above 1 says what splitting costs here,
not what it gains on W GPUs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from sptutor import console, cost, launch, layout
from sptutor.bench import common
from sptutor.methods import LINEAR_METHODS, METHODS

WORLDS = (1, 2, 4)
QUICK_WORLDS = (1, 2)  # --quick: two launches, a few seconds (four processes take ten on 2 cores)


def shape(quick: bool = False) -> cost.Shape:
    """B=1, Hq=4, Hkv=2, D=32, float32; S = 128 (quick) or 1024."""
    return cost.Shape(1, 128 if quick else 1024, 4, 2, 32, torch.float32)


def _repeats(quick: bool) -> int:
    return 1 if quick else 3


def _layout(method: str) -> str:
    return "contiguous" if method in LINEAR_METHODS else "zigzag"


def _attention(method: str, mesh):
    """This rank's call of ``method``: (q, k, v) shards -> out shard, causal."""
    import sptutor

    if method == "usp":
        return lambda q, k, v: sptutor.usp_attention(q, k, v, mesh=mesh, causal=True,
                                                     layout="zigzag")  # fmt: skip
    function = getattr(sptutor, f"{method}_attention")
    if method in LINEAR_METHODS:
        return lambda q, k, v: function(q, k, v, causal=True)
    return lambda q, k, v: function(q, k, v, causal=True, layout="zigzag")


def _seconds(call, tensors, repeats: int, sync=lambda: None) -> float:
    """Median seconds of ``call(q, k, v).backward(dout)`` over ``repeats``, after one warm-up;
    ``sync()`` before and after each (a barrier: the slowest rank's time)."""
    q, k, v, dout = tensors
    samples = []
    for _ in range(1 + repeats):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        sync()
        start = time.perf_counter()
        call(*leaves).backward(dout)
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def _on_rank(rank: int, world: int, sizes: cost.Shape, repeats: int) -> dict[str, float]:
    """Body of each process: every method in turn on this rank's shards; seconds per method."""
    import torch.distributed as dist

    import sptutor

    degree = common.ulysses_degree("usp", world)
    mesh = sptutor.make_usp_mesh(degree, world // degree)
    found = {}
    for method in METHODS:
        pieces = common.ulysses_degree(method, world) or 1
        shards = [layout.shard(x, world=world, layout=_layout(method), ulysses=pieces)[rank]
                  for x in common.inputs(sizes)]  # fmt: skip
        found[method] = _seconds(_attention(method, mesh), shards, repeats, dist.barrier)
    return found


def _reference(method: str):
    """One process, the whole sequence: fused SDPA, or causal linear attention in sub-chunks."""
    if method in LINEAR_METHODS:
        from sptutor import chunks

        return lambda q, k, v: chunks.intra_blocked(q, k, v, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused(q, k, v):  # SDPA takes (B, H, S, D): (B, S, H, D) -> (B, H, S, D) and back
        out = sdpa(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    return fused


def measure(quick: bool = False) -> list[dict]:
    """Rows of method, ``reference`` (what one process runs), ``single`` (its seconds) and
    ``seconds``, ``ratio``: {W: ...} for W = 1, 2, 4 (quick: 1, 2); a progress bar meanwhile."""
    sizes, repeats, worlds = shape(quick), _repeats(quick), QUICK_WORLDS if quick else WORLDS
    threads = torch.get_num_threads()
    with console.progress(1 + len(worlds), "bench time") as done:
        torch.set_num_threads(1)
        try:
            single = {m: _seconds(_reference(m), common.inputs(sizes), repeats) for m in METHODS}
        finally:
            torch.set_num_threads(threads)
        done("one process")
        distributed = {}
        for world in worlds:
            per_rank = launch.spawn(_on_rank, world, (sizes, repeats))
            distributed[world] = per_rank[0]
            done(f"{world} process{'es' if world > 1 else ''}")
    return [{"method": m, "reference": "chunks.intra_blocked" if m in LINEAR_METHODS else "sdpa",
             "single": single[m], "seconds": {w: distributed[w][m] for w in worlds},
             "ratio": {w: distributed[w][m] / single[m] for w in worlds}}
            for m in METHODS]  # fmt: skip


def run(out: Path | None = None, quick: bool = False) -> int:
    """Time, print the ratios; with ``out``, write time.json and time.png."""
    sizes, worlds = shape(quick), QUICK_WORLDS if quick else WORLDS
    console.say(f"wall time, causal forward + backward, S={sizes.seq_len}, "
                f"{common.describe(sizes)}, one thread per process, median of "
                f"{_repeats(quick)} after a warm-up")  # fmt: skip
    measured = measure(quick)
    console.table(
        [(r["method"], r["reference"], f"{r['single'] * 1e3:.1f}",
          *(f"{r['seconds'][w] * 1e3:.1f}" for w in worlds),
          *(f"{r['ratio'][w]:.2f}" for w in worlds)) for r in measured],
        ("method", "1 process", "ms", *(f"W={w} ms" for w in worlds),
         *(f"W={w} ratio" for w in worlds)),
        notes=("ratio: time on W gloo processes / time of one process with the whole sequence; "
               "printed, never checked.",),
    )  # fmt: skip
    figures = {"what": "time", "shape": {**common.shape_dict(sizes), "seq_len": sizes.seq_len},
               "causal": True, "rows": measured}  # fmt: skip
    common.write(out, "time", figures, lambda: draw(measured))
    return 0


def draw(measured: list[dict]):
    """Grouped bars: per method, its ratio on each W; a line at 1 (as fast as one process)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), layout="constrained")
    ax = figure.subplots()
    worlds = list(measured[0]["ratio"])
    width = 0.8 / len(worlds)
    for index, world in enumerate(worlds):
        ax.bar([m + (index - (len(worlds) - 1) / 2) * width for m in range(len(measured))],
               [r["ratio"][world] for r in measured], width, label=f"W = {world}")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(measured)), [r["method"] for r in measured])
    ax.set_ylabel("time / one process (lower is faster)")
    ax.set_title("forward + backward, causal, gloo processes on this CPU")
    ax.legend()
    return figure
