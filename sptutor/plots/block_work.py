"""Useful work of each (query rank, K/V block) of a ring-family call, and the blocks it skips.

A W × W grid: row r is the query rank, column b the K/V block of rank b. A computed cell has row
r's colour, shaded by its forward useful MACs (``alpha = macs / max``, as the schedule's compute
boxes), and reads its MACs and the steps of its compute events. A skipped cell (no forward compute
event: none of its (query, key) pairs is visible) is hatched and says why: the causal mask, or no
query shares a packed document with any key. Under USP rank r computes only the blocks of its ring
group (``b % U == r % U``); the other cells are grey. Each row's sum, the rank's forward useful
MACs, is written right of the grid: packing documents changes how evenly they fall.

What the artists carry (tests read these, not pixels):

- a cell: a ``Rectangle`` with gid ``"block:<rank>:<block>"`` and label ``"<macs> MACs"``
  (computed), ``"skipped: causal"`` or ``"skipped: documents"`` (no visible pair), or
  ``"other ring"`` (usp: not a block of this rank's ring).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from sptutor.plots import _blocks
from sptutor.plots._blocks import BLOCK_METHODS
from sptutor.plots._style import (
    SKIPPED_HATCH,
    axes_for,
    check_method,
    describe,
    format_count,
    rank_colour,
)

OTHER_RING = "0.85"
SHORT_REASONS = {"causal": "causal", "documents": "documents", "not computed": "??"}


def cells(sim: Any) -> dict[tuple[int, int], str]:
    """(rank, block) -> the label of its cell, for every cell of the W × W grid (see the module
    docstring)."""
    macs, candidates = _blocks.forward_macs(sim), set(_blocks.candidates(sim))
    found = {}
    for rank in range(sim.world):
        for block in range(sim.world):
            if (rank, block) in macs:
                found[(rank, block)] = f"{macs[(rank, block)]} MACs"
            elif (rank, block) in candidates:
                found[(rank, block)] = f"skipped: {_blocks.skip_reason(sim, rank, block)}"
            else:
                found[(rank, block)] = "other ring"
    return found


def _cell_text(label: str, steps: list[int]) -> str:
    if label.startswith("skipped: "):
        return "skipped\n" + SHORT_REASONS[label.removeprefix("skipped: ")]
    if label == "other ring":
        return "–"
    steps_text = ",".join(map(str, steps))
    return f"{format_count(int(label.split()[0]))}\nstep {steps_text}"


def _draw_cell(ax: Axes, sim: Any, key: tuple[int, int], label: str, shade: float, size: float):
    rank, block = key
    colour = rank_colour(rank, sim.world)
    computed, other = label.endswith("MACs"), label == "other ring"
    ax.add_patch(
        Rectangle(
            (block - 0.5, rank - 0.5),
            1.0,
            1.0,
            facecolor=(*colour[:3], shade) if computed else OTHER_RING if other else "white",
            edgecolor="0.75",
            hatch=None if computed or other else SKIPPED_HATCH,
            linewidth=0.8,
            gid=f"block:{rank}:{block}",
            label=label,
        )
    )
    steps = _blocks.forward_steps(sim).get(key, [])
    ax.text(
        block,
        rank,
        _cell_text(label, steps),
        ha="center",
        va="center",
        fontsize=size,
        bbox=None if computed else {"boxstyle": "round,pad=0.1", "facecolor": "white", "lw": 0},
    )


def block_work(sim: Any, *, ax: Axes | None = None) -> Figure:
    """The forward useful MACs of each (query rank, K/V block) of ``sim`` (rsa, ring, lss, usp),
    with the blocks it skips hatched. Returns ``ax``'s figure (a new one when ``ax`` is None);
    ValueError for a method without K/V blocks (ulysses, lasp, lasp2)."""
    check_method(sim, BLOCK_METHODS, "block_work")
    world = sim.world
    fig, ax = axes_for(ax, (max(5.5, 1.1 * world + 3.0), max(4.5, 0.9 * world + 2.5)))
    labels = cells(sim)
    macs = _blocks.forward_macs(sim)
    most = max(macs.values(), default=0)
    size = float(np.clip(30 / world, 4.5, 9))
    for key, label in labels.items():
        _draw_cell(ax, sim, key, label, macs.get(key, 0) / most if most else 0.0, size)
    for rank in range(world):
        total = sum(m for (r, _), m in macs.items() if r == rank)
        ax.text(world - 0.35, rank, f"Σ {format_count(total)}", va="center", fontsize=size)
    ax.set_xlim(-0.5, world + 0.6)
    ax.set_ylim(world - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(world), [str(b) for b in range(world)])
    ax.set_yticks(range(world), [f"rank {r}" for r in range(world)])
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for rank, tick in enumerate(ticks):
            tick.set_color(rank_colour(rank, world))
    ax.set_xlabel("K/V block: the rank whose keys and values (Σ: the row's forward MACs)")
    ax.set_ylabel("query rank")
    handles = [Patch(facecolor=rank_colour(0, world), label="computed: shade ∝ useful MACs")]
    if any(label.startswith("skipped") for label in labels.values()):
        handles.append(
            Patch(facecolor="white", edgecolor="0.6", hatch=SKIPPED_HATCH, label="skipped")
        )
    if any(label == "other ring" for label in labels.values()):
        handles.append(Patch(facecolor=OTHER_RING, label="not in its ring (usp)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=7,
              ncol=len(handles), frameon=False)  # fmt: skip
    ax.set_title(
        f"Useful work of each (query rank, K/V block), forward\n{describe(sim)}\n"
        "skipped = no visible (query, key) pair, so no compute event",
        fontsize=8,
    )
    return fig
