"""``sptutor bench balance``: how evenly a causal mask shares the useful work out, per layout.

Ring attention (and usp's ring) computes a block of queries against every block of keys; under a
causal mask a block above the diagonal is useless. Each rank's useful multiply-adds are summed
from the oracle's compute events (both phases); ``max/min`` is the busiest rank's over the
idlest's: 1.000 is perfectly balanced. Contiguous gives the last rank the most work, zigzag
pairs chunk r with chunk 2W-1-r so every rank gets as much, striped is nearly even.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sptutor import console, cost, oracle
from sptutor.bench import common
from sptutor.layout import LAYOUTS

SHAPE = cost.Shape(batch=1, seq_len=64, heads_q=4, heads_kv=2, head_dim=8, dtype=torch.float64)
METHODS = ("ring", "usp")
WORLDS = (2, 4, 8)


def rows(quick: bool = False) -> list[dict]:
    """One row per method, W, layout and rank: ``macs``, that rank's useful multiply-adds."""
    found = []
    for method in METHODS:
        for world in WORLDS[1:] if quick else WORLDS:
            degree = common.ulysses_degree(method, world)
            q, k, v, dout = common.inputs(SHAPE)
            for layout in LAYOUTS:
                sim = oracle.simulate(method, q, k, v, dout, world=world, causal=True,
                                      layout=layout, ulysses=degree)  # fmt: skip
                for rank in range(world):
                    found.append({"method": method, "world": world, "layout": layout,
                                  "rank": rank, "macs": sim.ledger.macs(rank)})  # fmt: skip
    return found


def ratios(measured: list[dict]) -> list[dict]:
    """One row per method, W and layout: ``min``, ``max`` MACs over its ranks and ``ratio``."""
    groups: dict[tuple, list[int]] = {}
    for row in measured:
        groups.setdefault((row["method"], row["world"], row["layout"]), []).append(row["macs"])
    return [{"method": method, "world": world, "layout": layout, "min": min(macs),
             "max": max(macs), "ratio": max(macs) / min(macs)}
            for (method, world, layout), macs in groups.items()]  # fmt: skip


def run(out: Path | None = None, quick: bool = False) -> int:
    """Print max/min per method, W and layout; with ``out``, write balance.json and balance.png."""
    measured = rows(quick)
    summary = ratios(measured)
    console.say(f"useful work per rank under a causal mask, S={SHAPE.seq_len}, "
                f"{common.describe(SHAPE)}, usp U=2 (its ring has R = W/2 ranks)")  # fmt: skip
    console.table(
        [(r["method"], r["world"], r["layout"], r["min"], r["max"], f"{r['ratio']:.3f}")
         for r in summary],
        ("method", "W", "layout", "min MACs", "max MACs", "max/min"),
        notes=("max/min: the busiest rank's useful multiply-adds over the idlest's "
               "(forward + backward); 1.000 = balanced.",),
    )  # fmt: skip
    figures = {"what": "balance", "shape": {**common.shape_dict(SHAPE), "seq_len": SHAPE.seq_len},
               "causal": True, "ratios": summary, "rows": measured}  # fmt: skip
    common.write(out, "balance", figures, lambda: draw(measured))
    return 0


def draw(measured: list[dict]):
    """``plots.balance`` of ring and of usp at the largest W, one above the other."""
    from matplotlib.figure import Figure

    from sptutor import plots

    world = max(r["world"] for r in measured)
    figure = Figure(figsize=(9, 4.2 * len(METHODS)), layout="constrained")
    for method, ax in zip(METHODS, figure.subplots(len(METHODS), 1)):
        plots.balance([r for r in measured if r["method"] == method and r["world"] == world],
                      ax=ax)  # fmt: skip
        ax.set_title(f"{method}, causal, W = {world}" + (", U = 2" if method == "usp" else ""))
    return figure
