"""The linear-attention state's journey (lasp, lasp2): ranks as boxes in sequence order, forward
messages above them, backward messages below.

LASP (causal) passes the D×D state KV rank to rank: W-1 arrows forward, and its gradient dKV back:
W-1 arrows backward. LASP-2 gathers every rank's state at once: one all-gather band per phase.
Without a causal mask both sum the states over all ranks (LASP: all-reduce, LASP-2: all-gather).

What the artists carry (tests read these, not pixels):

- a send: a ``FancyArrowPatch``, gid ``"send:<phase>:<rank>:<seq>"``, label the bytes, from the
  sender's box to the receiver's;
- a collective: a ``Rectangle`` over its group's boxes, gid
  ``"<op>:<phase>:<group ranks, comma-separated>:<k>"``, label the bytes each member sends.
"""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from sptutor.methods import LINEAR_METHODS
from sptutor.plots import _events
from sptutor.plots._style import (
    BAND_COLOUR,
    BAND_EDGE,
    HATCHES,
    OP_NAMES,
    axes_for,
    check_method,
    describe,
    documents,
    format_bytes,
    rank_colour,
)

PITCH = 3.0  # x distance between two ranks' boxes
WIDTH = 2.0  # a box's width
SIDE = {"forward": 1.0, "backward": -1.0}  # forward above the boxes, backward below
NAMES = {"forward": "KV", "backward": "dKV"}


def _draw_box(ax: Axes, sim: Any, rank: int) -> None:
    colour = rank_colour(rank, sim.world)
    tokens = sim.positions[rank]
    ax.add_patch(
        FancyBboxPatch(
            (rank * PITCH, -0.45),
            WIDTH,
            0.9,
            boxstyle="round,pad=0.05",
            facecolor=(*colour[:3], 0.25),
            edgecolor=colour,
        )
    )
    span = f"{int(tokens.min())}–{int(tokens.max())}" if len(tokens) else "none"
    docs = documents(sim)
    held = (
        ""
        if docs is None
        else "\ndocs " + ",".join(map(str, sorted(set(docs[tokens.numpy()].tolist()))))
    )
    ax.text(
        rank * PITCH + WIDTH / 2,
        0,
        f"rank {rank}\ntokens {span}{held}",
        ha="center",
        va="center",
        fontsize=8,
        color=colour,
    )


def _draw_send(ax: Axes, sim: Any, event) -> None:
    side = SIDE[event.phase]
    forward = event.peer > event.rank
    start = event.rank * PITCH + (WIDTH - 0.3 if forward else 0.3)
    end = event.peer * PITCH + (0.3 if forward else WIDTH - 0.3)
    label = format_bytes(event.nbytes)
    # forward arcs bulge up, backward ones down (arc3's sign follows the direction of travel)
    bend = -0.45 * side if forward else 0.45 * side
    ax.add_patch(
        FancyArrowPatch(
            (start, 0.5 * side),
            (end, 0.5 * side),
            arrowstyle="-|>",
            mutation_scale=10,
            color=rank_colour(event.rank, sim.world),
            connectionstyle=f"arc3,rad={bend}",
            linewidth=1.2,
            gid=f"send:{event.phase}:{event.rank}:{event.seq}",
            label=label,
        )
    )
    ax.text(
        (start + end) / 2,
        1.25 * side,
        f"{NAMES[event.phase]} {label}\nstep {event.step}",
        ha="center",
        va="center",
        fontsize=7,
    )


def _draw_collective(ax: Axes, call: _events.Collective, row: int) -> None:
    side = SIDE[call.phase]
    left, right = min(call.group) * PITCH - 0.1, max(call.group) * PITCH + WIDTH + 0.1
    bottom = side * (0.9 + 0.8 * row) - (0.6 if side < 0 else 0)
    sizes = sorted({event.nbytes for event in call.events})
    label = "–".join(format_bytes(size) for size in sizes)
    ax.add_patch(
        Rectangle(
            (left, bottom),
            right - left,
            0.6,
            facecolor=BAND_COLOUR,
            edgecolor=BAND_EDGE,
            hatch=HATCHES[call.op],
            gid=call.gid,
            label=label,
        )
    )
    ax.text(
        (left + right) / 2,
        bottom + 0.3,
        f"{OP_NAMES[call.op]} of the {NAMES[call.phase]} states: {label} sent per rank",
        ha="center",
        va="center",
        fontsize=8,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"},
    )


def state_chain(sim: Any, *, ax: Axes | None = None) -> Figure:
    """How the state of ``sim`` (lasp or lasp2) moves between ranks, from its ledger.

    Returns ``ax``'s figure (a new one when ``ax`` is None); ValueError for other methods.
    """
    check_method(sim, LINEAR_METHODS, "state_chain")
    fig, ax = axes_for(ax, (max(2.0 + 1.6 * sim.world, 6.0), 4.0))
    for rank in range(sim.world):
        _draw_box(ax, sim, rank)
    rows = {"forward": 0, "backward": 0}
    for event in sim.ledger.events:
        if event.op == "send":
            _draw_send(ax, sim, event)
    for phase in rows:
        for call in _events.collectives(sim.ledger.events, phase):
            _draw_collective(ax, call, rows[phase])
            rows[phase] += 1
    for phase, side in SIDE.items():
        arrow = "→" if side > 0 else "←"
        ax.text(
            -0.3,
            1.25 * side,
            f"{phase} {arrow}",
            ha="right",
            va="center",
            fontsize=9,
            weight="bold",
        )
    most_rows = max(1, *rows.values())
    ax.set_xlim(-2.2, (sim.world - 1) * PITCH + WIDTH + 0.3)
    ax.set_ylim(-1.0 - 0.8 * most_rows - 0.4, 1.0 + 0.8 * most_rows + 0.4)
    ax.set_axis_off()
    batch, _, heads_q, _, head_dim = sim.shape
    ax.set_title(
        f"The state's journey: {describe(sim)}\nstate KV (B, Hq, D, D) = "
        f"({batch}, {heads_q}, {head_dim}, {head_dim}); bytes from the ledger",
        fontsize=8,
    )
    return fig
