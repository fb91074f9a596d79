"""The schedule of a simulated call: ranks as lanes, each rank's events in its own order.

Forward on the left, backward on the right of a dashed divider. A compute box is shaded by its
useful MACs (``alpha = macs / max macs of the call``: darker = more useful work, so idle ranks and
imbalance show); a send is an arrow from the sender's lane to the receiver's, labelled with its
bytes; a collective is one grey band over its group's lanes, labelled with the bytes each member
puts on the wire.

What the artists carry (tests read these, not pixels):

- compute box: a ``Rectangle``, gid ``"compute:<phase>:<rank>:<seq>"``, label ``"<macs> MACs"``;
- send: a ``FancyArrowPatch``, gid ``"send:<phase>:<rank>:<seq>"``, label ``format_bytes(nbytes)``,
  from ``(column, rank)`` to ``(column + 0.45, peer)``; its bytes written at ``(column, rank)``
  by a ``Text`` with gid ``"send-label:<phase>:<rank>:<seq>"``;
- collective: a ``PathPatch`` (one rectangle per run of adjacent lanes), gid
  ``"<op>:<phase>:<group ranks, comma-separated>:<k>"`` (the k-th such call), label the bytes;
- the divider: a ``Line2D`` with gid ``"phase-divider"`` (forward artists left of it).
"""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch, PathPatch, Rectangle
from matplotlib.path import Path

from sptutor.ledger import PHASES
from sptutor.plots import _events
from sptutor.plots._style import (
    BAND_COLOUR,
    BAND_EDGE,
    HATCHES,
    OP_NAMES,
    axes_for,
    describe,
    format_bytes,
    format_count,
    rank_colour,
    runs,
)

BOX = 0.4  # half the width of a column's box, in columns
SEND_REACH = 0.45  # a send's arrow ends this far right of its column, on the receiver's lane


def _bytes_label(values: list[int]) -> str:
    """One byte count, or the range when members put different amounts on the wire."""
    low, high = min(values), max(values)
    return format_bytes(low) if low == high else f"{format_bytes(low)}–{format_bytes(high)}"


def _draw_compute(ax: Axes, event, x: float, world: int, most_macs: int) -> None:
    colour = rank_colour(event.rank, world)
    shade = event.macs / most_macs if most_macs else 0.0
    box = Rectangle(
        (x - BOX, event.rank - 0.3),
        2 * BOX,
        0.6,
        facecolor=(*colour[:3], shade),
        edgecolor=colour,
        linewidth=1.0,
        zorder=2,
        gid=f"compute:{event.phase}:{event.rank}:{event.seq}",
        label=f"{event.macs} MACs",
    )
    ax.add_patch(box)
    if event.block is not None:  # whose K/V block (ring family): the number in the box
        ax.text(x, event.rank, str(event.block), ha="center", va="center", fontsize=6, zorder=3)


def _draw_send(ax: Axes, event, x: float, world: int) -> None:
    colour = rank_colour(event.rank, world)
    bend = 0.0 if abs(event.peer - event.rank) <= 1 else 0.25  # wrap-around sends arc aside
    label = format_bytes(event.nbytes)
    arrow = FancyArrowPatch(
        (x, event.rank),
        (x + SEND_REACH, event.peer),
        arrowstyle="-|>",
        mutation_scale=7,
        color=colour,
        linewidth=0.9,
        shrinkA=5,
        shrinkB=1,
        connectionstyle=f"arc3,rad={bend}",
        zorder=1,
        gid=f"send:{event.phase}:{event.rank}:{event.seq}",
        label=label,
    )
    ax.add_patch(arrow)
    ax.text(
        x,
        event.rank,
        label,
        ha="center",
        va="center",
        fontsize=5.5,
        zorder=4,
        gid=f"send-label:{event.phase}:{event.rank}:{event.seq}",
        bbox={
            "boxstyle": "round,pad=0.15",
            "facecolor": "white",
            "edgecolor": colour,
            "linewidth": 0.6,
        },
    )


def _draw_collective(ax: Axes, call: _events.Collective, x: float) -> None:
    lane_runs = runs(call.group)
    rectangles = [
        Path.unit_rectangle().transformed(
            Rectangle((x - BOX, first - 0.42), 2 * BOX, last - first + 0.84).get_patch_transform()
        )
        for first, last in lane_runs
    ]
    label = _bytes_label([event.nbytes for event in call.events])
    band = PathPatch(
        Path.make_compound_path(*rectangles),
        facecolor=BAND_COLOUR,
        edgecolor=BAND_EDGE,
        hatch=HATCHES[call.op],
        linewidth=0.8,
        zorder=1,
        gid=call.gid,
        label=label,
    )
    ax.add_patch(band)
    first, last = lane_runs[0]
    ax.text(
        x,
        (first + last) / 2,
        f"{OP_NAMES[call.op]} {label}",
        rotation=90,
        ha="center",
        va="center",
        fontsize=5.5,
        zorder=3,
        bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none"},
    )


def _draw_phase(
    ax: Axes, events, phase: str, column: dict, offset: int, world: int, most_macs: int
) -> None:
    """Draw one phase's events at ``offset + column[(rank, seq)]``."""
    for event in events:
        if event.phase != phase:
            continue
        x = offset + column[(event.rank, event.seq)]
        if event.op == "compute":
            _draw_compute(ax, event, x, world, most_macs)
        elif event.op == "send":
            _draw_send(ax, event, x, world)
    for call in _events.collectives(events, phase):
        _draw_collective(ax, call, offset + column[(call.events[0].rank, call.events[0].seq)])


def _legend(ax: Axes, events, world: int, most_macs: int) -> None:
    ops = {event.op for event in events}
    handles = [
        Patch(
            facecolor=rank_colour(0, world),
            edgecolor=rank_colour(0, world),
            label=f"compute: shade ∝ useful MACs (full = {format_count(most_macs)})"
            + ("; number = whose K/V block" if any(e.block is not None for e in events) else ""),
        )
    ]
    if "send" in ops:
        handles.append(
            Line2D(
                [], [], color="0.3", marker=">", markersize=4, label="send, labelled with its bytes"
            )
        )
    for op, hatch in HATCHES.items():
        if op in ops:
            handles.append(
                Patch(
                    facecolor=BAND_COLOUR,
                    edgecolor=BAND_EDGE,
                    hatch=hatch,
                    label=f"{OP_NAMES[op]} band: bytes each rank sends",
                )
            )
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        fontsize=7,
        ncol=min(len(handles), 3),
        frameon=False,
    )


def _style_lanes(ax: Axes, world: int, width: int) -> None:
    for rank in range(world):
        ax.axhline(rank, color=rank_colour(rank, world), alpha=0.3, linewidth=0.8, zorder=0)
    ax.set_yticks(range(world), [f"rank {rank}" for rank in range(world)])
    for rank, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(rank_colour(rank, world))
    ax.set_ylim(world - 0.4, -1.3)  # rank 0 on top, room for the phase headers
    ax.set_xlim(-0.8, width - 0.5 + SEND_REACH + 0.3)
    ax.set_xticks([])
    ax.set_xlabel(
        "each rank's events in its own order (a collective lines up across its group; "
        "not wall-clock time)",
        fontsize=8,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def schedule(sim: Any, *, ax: Axes | None = None) -> Figure:
    """Timeline of ``sim`` (an ``oracle.simulate`` result): ranks as lanes, events as columns.

    Returns ``ax``'s figure (a new one, sized to the timeline, when ``ax`` is None). See the
    module docstring for what each artist carries.
    """
    events, world = sim.ledger.events, sim.world
    most_macs = max((e.macs for e in events if e.op == "compute"), default=0)
    placed = {p: _events.columns(events, p) for p in PHASES if any(e.phase == p for e in events)}
    widths = [max(column.values()) + 1 for column in placed.values()]
    total = sum(widths) + len(widths) - 1  # one empty column between the phases
    # at least 10 x 3.6 in: the title and the legend below need that room even for few events
    fig, ax = axes_for(ax, (min(max(2.0 + 0.42 * total, 10.0), 60.0), max(3.6, 2.2 + 0.5 * world)))
    start = 0
    for (phase, column), width in zip(placed.items(), widths):
        if start:
            ax.axvline(start - 1, color="0.4", linestyle="--", linewidth=1, gid="phase-divider")
        _draw_phase(ax, events, phase, column, start, world, most_macs)
        ax.text(start + (width - 1) / 2, -0.95, phase, ha="center", fontsize=9, weight="bold")
        start += width + 1
    _style_lanes(ax, world, total)
    _legend(ax, events, world, most_macs)
    ax.set_title(f"Schedule: {describe(sim)}", fontsize=9)
    return fig
