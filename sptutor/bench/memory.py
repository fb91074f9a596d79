"""``sptutor bench memory``: bytes each rank keeps for backward, from the oracle
(``sim.ranks[r].saved_bytes``), next to ``sptutor.cost``'s closed form (equal, always) and the
ideal ``full / W``: what one process keeps for the whole sequence (the same method's oracle on
W = 1), divided by W. ``saved / ideal`` is 1 for a method that splits everything it keeps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sptutor import console
from sptutor.bench import comm, common
from sptutor.methods import METHODS

SHAPE = comm.SHAPE
NOTES = (
    "saved: bytes kept for backward by the busiest rank; = cost: equal to sptutor.cost exactly; "
    "full: the same method on W = 1.",
    "saved/ideal: 1.000 splits everything; lss keeps the gathered K and V (O(S) whatever W); "
    "lasp, lasp2 keep one D×D state per rank > 0.",
)


def rows(quick: bool = False) -> list[dict]:
    """One measured row per method, W and S (see :func:`sptutor.bench.common.measure`), with
    ``full`` (saved bytes on one process) and ``ideal`` = full / W."""
    found = []
    for method in METHODS:
        for seq_len in (16, 32) if quick else (16, 32, 64):
            shape = replace(SHAPE, seq_len=seq_len)
            full = common.measure(method, shape, 1)["saved"]
            for world in comm.WORLDS:
                row = common.measure(method, shape, world)
                row.update(full=full, ideal=full / world)
                found.append(row)
    return found


def run(out: Path | None = None, quick: bool = False) -> int:
    """Print the measured table; with ``out``, write memory.json and memory.png."""
    measured = rows(quick)
    console.say(f"bytes kept for backward per rank, oracle vs sptutor.cost vs full/W, causal, "
                f"{common.describe(SHAPE)}, usp U=2 on even W")  # fmt: skip
    console.table(
        [(r["method"], r["world"], r["seq_len"], r["saved"], r["saved"] == r["cost_saved"],
          r["full"], round(r["ideal"]), f"{r['saved'] / r['ideal']:.3f}") for r in measured],
        ("method", "W", "S", "saved B", "= cost", "full B (W=1)", "ideal B", "saved/ideal"),
        notes=NOTES,
    )  # fmt: skip
    figures = {"what": "memory", "shape": common.shape_dict(SHAPE), "causal": True,
               "rows": measured}  # fmt: skip
    common.write(out, "memory", figures, lambda: comm.draw(measured, "saved"))
    return 0 if all(r["saved"] == r["cost_saved"] for r in measured) else 1
