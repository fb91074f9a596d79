"""``sptutor bench time``: wall time of every real method on 1, 2 and 4 gloo processes, as a
ratio to one process doing the same work without splitting it, against the goal of each method.

The single-process reference is PyTorch's fused attention
(``torch.nn.functional.scaled_dot_product_attention``) for the softmax methods, and the chunked
form the linear methods are built from for lasp and lasp2: :func:`sptutor.chunks.intra_blocked`,
the whole sequence as a chain of sub-chunks carrying the D×D state, as one LASP rank computes its
chunk. Every call is causal, forward + backward; softmax methods use the zigzag layout, lasp and
lasp2 contiguous. Each figure is the median of a few repeats after a warm-up; a distributed repeat
runs from one barrier to the next, so it is the slowest rank's time.

Threads: each of the W processes runs one intra-op thread; the reference it is compared with runs
on the same total number of threads, W, capped at this machine's cores (:func:`reference_threads`),
so both sides use the same cores and a ratio is what splitting costs on that hardware (1: nothing).
The goal (:func:`goal`, "not slower than one process"): at W = 4 every method but RSA
within 1.5x of its reference. Times are printed and the goal is judged from them, never asserted:
on a shared CPU they move with the machine's load.

Under ``torchrun`` (``torchrun --standalone --nproc_per_node N -m sptutor.bench time``) the
methods run on torchrun's N ranks instead (``sptutor.bench.timing_torchrun``).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from sptutor import console, cost, launch, layout, torchrun
from sptutor.bench import common
from sptutor.methods import LINEAR_METHODS, METHODS

WORLDS = (1, 2, 4)
QUICK_WORLDS = (1, 2)  # --quick: two launches, a few seconds (four processes take ten on 2 cores)
GOAL = 1.5  # each method but RSA within 1.5x of one process doing the same work
NO_GOAL = "none, its full score rows are the point"  # RSA: every rank computes full score rows


def shape(quick: bool = False) -> cost.Shape:
    """B=1, float32; the goal's S=4096, Hq=Hkv=8, D=64, or (quick) S=128, Hq=4, Hkv=2, D=32."""
    if quick:
        return cost.Shape(1, 128, 4, 2, 32, torch.float32)
    return cost.Shape(1, 4096, 8, 8, 64, torch.float32)


def goal(method: str) -> float | None:
    """The largest ratio ``method`` may have at the largest W: 1.5, or None (rsa: no goal)."""
    return None if method == "rsa" else GOAL


def meets(method: str, ratio: float) -> bool | None:
    """Is ``ratio`` within ``method``'s goal (None when it has none)?"""
    limit = goal(method)
    return None if limit is None else ratio <= limit


def cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def reference_threads(world: int) -> int:
    """Intra-op threads of the one process compared with W processes of one thread each: their
    total, W, capped at :func:`cores` (more threads than cores only share them)."""
    return max(1, min(world, cores()))


def repeat_count(quick: bool) -> int:
    """Timed calls per figure, after a warm-up: 3 (quick: 1)."""
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


def synchronizer(device: torch.device, barrier: bool):
    """``sync()`` around a measured call: wait for the GPU's queued work (CUDA) and, with
    ``barrier``, for every rank (so a repeat is the slowest rank's time)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if barrier:
            import torch.distributed as dist

            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    return sync


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


def on_rank(rank: int, world: int, sizes: cost.Shape, repeats: int,
            device: torch.device | None = None) -> dict[str, float]:  # fmt: skip
    """Body of each process: every method in turn on this rank's shards (on ``device``, CPU by
    default); seconds per method."""
    import sptutor

    device = torch.device("cpu") if device is None else device
    degree = common.ulysses_degree("usp", world)
    mesh = sptutor.make_usp_mesh(degree, world // degree)
    found = {}
    for method in METHODS:
        pieces = common.ulysses_degree(method, world) or 1
        shards = [layout.shard(x, world=world, layout=_layout(method), ulysses=pieces)[rank]
                  .to(device) for x in common.inputs(sizes)]  # fmt: skip
        sync = synchronizer(device, barrier=True)
        found[method] = _seconds(_attention(method, mesh), shards, repeats, sync)
    return found


def _reference(method: str):
    """One process, the whole sequence: fused SDPA, or causal linear attention in sub-chunks."""
    if method in LINEAR_METHODS:
        from sptutor import chunks

        return lambda q, k, v: chunks.intra_blocked(q, k, v, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def whole(q, k, v):  # SDPA takes (B, H, S, D): (B, S, H, D) -> (B, H, S, D) and back
        out = sdpa(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    return whole


def single(sizes: cost.Shape, repeats: int, threads: int,
           device: torch.device | None = None) -> dict[str, float]:  # fmt: skip
    """Seconds of every method's single-process reference, the whole sequence on ``device``
    (CPU by default) with ``threads`` intra-op threads."""
    device = torch.device("cpu") if device is None else device
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = [x.to(device) for x in common.inputs(sizes)]
        sync = synchronizer(device, barrier=False)
        return {m: _seconds(_reference(m), tensors, repeats, sync) for m in METHODS}
    finally:
        torch.set_num_threads(before)


def rows(references: dict[int, dict[str, float]], threads: dict[int, int | None],
         distributed: dict[int, dict[str, float]], judged: bool = True) -> list[dict]:  # fmt: skip
    """Table rows from ``{W: {method: seconds}}`` of the references and of the W ranks
    (``threads[W]``: the reference's threads, None on a GPU); ratios and goals computed here.
    ``judged``: False for ``--quick``'s shape, too small for the goal (per-call overheads
    dominate it), so ``meets`` is None there."""
    worlds, last = list(distributed), max(distributed)
    found = []
    for m in METHODS:
        ratio = {w: distributed[w][m] / references[w][m] for w in worlds}
        found.append({
            "method": m, "reference": "chunks.intra_blocked" if m in LINEAR_METHODS else "sdpa",
            "threads": threads, "single": {w: references[w][m] for w in worlds},
            "seconds": {w: distributed[w][m] for w in worlds}, "ratio": ratio,
            "goal": goal(m), "meets": meets(m, ratio[last]) if judged else None,
            "judged": judged,
        })  # fmt: skip
    return found


def measure(quick: bool = False) -> list[dict]:
    """Rows (:func:`rows`) for W = 1, 2, 4 gloo processes (quick: 1, 2) and their references;
    a progress bar meanwhile."""
    sizes, repeats, worlds = shape(quick), repeat_count(quick), QUICK_WORLDS if quick else WORLDS
    threads = {w: reference_threads(w) for w in worlds}
    counts = sorted(set(threads.values()))
    with console.progress(len(counts) + len(worlds), "bench time") as done:
        by_count = {}
        for count in counts:
            by_count[count] = single(sizes, repeats, count)
            done(f"one process, {_threads(count)}")
        distributed = {}
        for world in worlds:
            distributed[world] = launch.spawn(on_rank, world, (sizes, repeats))[0]
            done(f"{world} process{'es' if world > 1 else ''}")
    return rows({w: by_count[threads[w]] for w in worlds}, threads, distributed, not quick)


def unjudged(measured: list[dict], sizes: cost.Shape) -> tuple[str, ...]:
    """The note for rows not judged against the goal (``--quick``), else nothing."""
    if measured[0]["judged"]:
        return ()
    full = shape()
    said = (f"goal: each method but rsa within {GOAL}x at W=4 and S={full.seq_len} (without "
            f"--quick); S={sizes.seq_len} is too small to judge it (per-call overheads dominate "
            "here), so 'meets' is '-'.")  # fmt: skip
    return (said,)


def _threads(count: int | None) -> str:
    return "1 GPU" if count is None else f"{count} thread{'s' if count > 1 else ''}"


def header(sizes: cost.Shape, quick: bool, where: str) -> None:
    """The line above the table: what is timed, on what."""
    console.say(f"wall time, causal forward + backward, S={sizes.seq_len}, "
                f"{common.describe(sizes)}, {where}, median of {repeat_count(quick)} "
                "after a warm-up")  # fmt: skip


def show(measured: list[dict], sizes: cost.Shape, out: Path | None, notes: tuple = ()) -> None:
    """Print the table of ``measured`` (:func:`rows`), then write time.json, time.png to ``out``."""
    worlds, last = list(measured[0]["ratio"]), max(measured[0]["ratio"])
    threads = measured[0]["threads"]
    counts = list(dict.fromkeys(threads[w] for w in worlds))  # distinct, in W order
    console.table(
        [(r["method"], r["reference"],
          *(f"{next(r['single'][w] for w in worlds if threads[w] == c) * 1e3:.1f}"
            for c in counts),
          *(f"{r['seconds'][w] * 1e3:.1f}" for w in worlds),
          *(f"{r['ratio'][w]:.2f}" for w in worlds),
          NO_GOAL if r["goal"] is None else f"<= {r['goal']}", r["meets"]) for r in measured],
        ("method", "1 process", *(f"{_threads(c)} ms" for c in counts),
         *(f"W={w} ms" for w in worlds), *(f"W={w} ratio" for w in worlds), "goal",
         f"W={last} meets"),
        notes=notes + unjudged(measured, sizes) if notes else (
            f"ratio: time on W gloo processes (1 thread each) / time of one process with the "
            f"whole sequence on min(W, {cores()}) threads (W's total, capped at this machine's "
            "cores): both use the same cores; 1 = splitting costs nothing.",
            *(unjudged(measured, sizes) or (
                f"goal: each method but rsa within {GOAL}x at W={last}; 'meets' is "
                f"computed from the W={last} ratio; lasp, lasp2 against chunks.intra_blocked, "
                "sptutor's own single-process chunked linear attention.",)),
            "times move with this machine's load (others' tests): judged, never asserted.",
        ),
    )  # fmt: skip
    figures = {"what": "time", "shape": {**common.shape_dict(sizes), "seq_len": sizes.seq_len},
               "causal": True, "rows": measured}  # fmt: skip
    common.write(out, "time", figures, lambda: draw(measured))


def run(out: Path | None = None, quick: bool = False) -> int:
    """Time, print the ratios and goals; with ``out``, write time.json and time.png. Under
    torchrun, on its ranks (rank 0 prints)."""
    if torchrun.launched():
        from sptutor.bench import timing_torchrun

        return timing_torchrun.run(out=out, quick=quick)
    sizes = shape(quick)
    header(sizes, quick, "one thread per process")
    show(measure(quick), sizes, out)
    return 0


def draw(measured: list[dict]):
    """Grouped bars: per method, its ratio on each W; a line at 1 (as fast as one process) and a
    dashed one at the goal."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), layout="constrained")
    ax = figure.subplots()
    worlds = list(measured[0]["ratio"])
    width = 0.8 / len(worlds)
    for index, world in enumerate(worlds):
        ax.bar([m + (index - (len(worlds) - 1) / 2) * width for m in range(len(measured))],
               [r["ratio"][world] for r in measured], width, label=f"W = {world}")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(GOAL, color="black", linewidth=0.8, linestyle="--", label=f"goal {GOAL}")
    ax.set_xticks(range(len(measured)), [r["method"] for r in measured])
    ax.set_ylabel("time / one process (lower is faster)")
    ax.set_title("forward + backward, causal, on the same cores")
    ax.legend()
    return figure
