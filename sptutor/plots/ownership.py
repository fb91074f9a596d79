"""Who computes which part of the S×S attention matrix, and at which ring step (ring family).

Axes in global token order (query i down, key j across), so zigzag and striped show their pattern.
Cell (i, j) has the colour of the rank that owns query i, if that rank has a forward compute event
on the block holding key j (``event.block``; under USP a block is the whole ulysses group's tokens,
so the ring index ``block // U`` names it); masked pairs (causal, or across packed documents) are
blank (white). Each rectangle of a (query rank, key block) tile is labelled with the steps of those
compute events. Dark lines mark where a packed document starts (``sim.cu_seqlens``); the tiles of
blocks nobody computes (no visible pair: no compute event) are hatched.

What the artists carry (tests read these, not pixels):

- the matrix: the ``AxesImage`` with gid ``"ownership"``; its array (S, S) holds the computing rank
  of each cell, masked (NaN) where nothing is computed;
- a step label: a ``Text`` with gid ``"step:<query rank>:<block>:<n>"`` (n numbers the labels,
  so SVG ids stay unique) and the steps, comma-separated;
- a skipped tile: ``Rectangle`` patches with gid ``"skipped:<query rank>:<block>:<n>"``;
- a document boundary p: ``Line2D`` with gids ``"document:<p>"`` and ``"document-row:<p>"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from sptutor.plots import _blocks
from sptutor.plots._blocks import BLOCK_METHODS
from sptutor.plots._style import (
    DOCUMENT_COLOUR,
    MASKED_COLOUR,
    SKIPPED_HATCH,
    axes_for,
    boundaries,
    check_method,
    describe,
    draw_boundaries,
    owners,
    rank_colormap,
    rank_colour,
    runs,
)

SKIPPED_EDGE = "0.7"  # the hatch of a skipped tile: light, so the masked area still reads white

RING_FAMILY = BLOCK_METHODS
MOST_LABELS = 400  # beyond this many tile rectangles the numbers would not fit; they are left out
MOST_TICKS = 32  # a tick for every token up to this sequence length


def _matrix(sim: Any, steps: dict[tuple[int, int], list[int]]) -> np.ndarray:
    """(S, S): the rank that computes (query i, key j), NaN where masked or never computed."""
    owner = owners(sim)  # (S,)
    ring_index = owner // sim.ulysses  # (S,) which block holds each key
    computes = np.zeros((sim.world, sim.world // sim.ulysses), dtype=bool)
    for rank, block in steps:
        computes[rank, block // sim.ulysses] = True
    tokens = np.arange(len(owner))
    covered = computes[owner[:, None], ring_index[None, :]]  # (S, S)
    seen = _blocks.visible(sim, tokens, tokens)  # (S, S): causal mask and documents
    return np.where(seen & covered, owner[:, None].astype(float), np.nan)


def _rectangles(sim: Any, rank: int, block: int):
    """(q_first, q_last, k_first, k_last) of each rectangle of the tile of rank's queries
    against block's keys, in global positions (zigzag and striped tiles are several)."""
    for q_first, q_last in runs(_blocks.group_tokens(sim, rank)):
        for k_first, k_last in runs(_blocks.group_tokens(sim, block)):
            yield q_first, q_last, k_first, k_last


def _visible_centre(seen: np.ndarray, q_first: int, k_first: int) -> tuple[float, float]:
    """(x, y): the centre of the visible cells of a rectangle (``seen``: its (rows, keys) bool
    visibility, from (q_first, k_first)), moved onto the nearest visible cell if it is masked."""
    rows, keys = np.nonzero(seen)
    y, x = rows.mean(), keys.mean()
    nearest = int(np.argmin((rows - y) ** 2 + (keys - x) ** 2))
    if not seen[round(y), round(x)]:
        y, x = rows[nearest], keys[nearest]
    return float(k_first + x), float(q_first + y)


def _label_rectangles(sim: Any, steps) -> list[tuple[str, str, float, float, int]]:
    """(gid, text, x, y, size in cells) of each visible rectangle of each computed tile."""
    labels = []
    tokens = np.arange(sim.shape[1])
    seen = _blocks.visible(sim, tokens, tokens)  # (S, S)
    for (rank, block), tile_steps in sorted(steps.items()):
        text = ",".join(map(str, tile_steps))
        # under USP a rank attends the queries of its whole ulysses group (for H/U heads)
        for q_first, q_last, k_first, k_last in _rectangles(sim, rank, block):
            part = seen[q_first : q_last + 1, k_first : k_last + 1]
            if not part.any():
                continue  # every pair of the rectangle is masked
            x, y = _visible_centre(part, q_first, k_first)
            size = min(q_last - q_first, k_last - k_first) + 1
            labels.append((f"step:{rank}:{block}", text, x, y, size))
    return labels


def _draw_skipped(ax: Axes, sim: Any) -> bool:
    """Hatch the tiles of the blocks no rank computes (no visible pair): a ``Rectangle`` with gid
    ``"skipped:<rank>:<block>:<n>"`` each. Returns whether there was any."""
    drawn = set()
    for rank, block in _blocks.skipped(sim):
        groups = (rank // sim.ulysses, block // sim.ulysses)  # USP: a group's ranks share rows
        if groups in drawn:
            continue
        drawn.add(groups)
        for index, (q_first, q_last, k_first, k_last) in enumerate(_rectangles(sim, rank, block)):
            ax.add_patch(
                Rectangle(
                    (k_first - 0.5, q_first - 0.5),
                    k_last - k_first + 1,
                    q_last - q_first + 1,
                    facecolor="none",
                    edgecolor=SKIPPED_EDGE,
                    hatch=SKIPPED_HATCH,
                    linewidth=0,
                    gid=f"skipped:{rank}:{block}:{index}",
                )
            )
    return bool(drawn)


def _draw_labels(ax: Axes, sim: Any, steps, fig: Figure) -> bool:
    """Write the step numbers; returns False when there were too many to write."""
    labels = _label_rectangles(sim, steps)
    if len(labels) > MOST_LABELS:
        return False
    width_in = fig.get_size_inches()[0] * ax.get_position().width
    cell_points = 72 * width_in / sim.shape[1]
    for index, (gid, text, x, y, size) in enumerate(labels):
        fontsize = float(np.clip(0.5 * cell_points * size / max(len(text), 1), 4, 11))
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, gid=f"{gid}:{index}")
    return True


def _tile_lines(ax: Axes, sim: Any) -> None:
    """White lines where the query's owner changes (rows) or the key's block changes (columns)."""
    owner = owners(sim)
    for i in np.flatnonzero(owner[1:] != owner[:-1]):
        ax.axhline(i + 0.5, color="white", linewidth=1.2)
    blocks = owner // sim.ulysses
    for j in np.flatnonzero(blocks[1:] != blocks[:-1]):
        ax.axvline(j + 0.5, color="white", linewidth=1.2)


def _ticks(ax: Axes, sim: Any) -> None:
    seq_len, owner = sim.shape[1], owners(sim)
    ax.set_xlabel("key token j (global position)")
    ax.set_ylabel("query token i (global position)")
    if seq_len > MOST_TICKS:
        return
    ax.set_xticks(range(seq_len), [str(j) for j in range(seq_len)], fontsize=6)
    ax.set_yticks(range(seq_len), [str(i) for i in range(seq_len)], fontsize=6)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for token, tick in enumerate(ticks):
            tick.set_color(rank_colour(owner[token], sim.world))


def ownership(sim: Any, *, ax: Axes | None = None) -> Figure:
    """The (S, S) attention matrix of ``sim`` (rsa, ring, lss, usp) coloured by computing rank.

    Tick labels have their token's owner's colour. Returns ``ax``'s figure (a new one when ``ax``
    is None); ValueError for a method without K/V blocks (ulysses, lasp, lasp2).
    """
    check_method(sim, RING_FAMILY, "ownership")
    fig, ax = axes_for(ax, (7.5, 6.5))
    steps = _blocks.forward_steps(sim)
    seq_len = sim.shape[1]
    ax.imshow(
        _matrix(sim, steps),
        cmap=rank_colormap(sim.world),
        vmin=-0.5,
        vmax=sim.world - 0.5,
        alpha=0.8,
        interpolation="nearest",
        extent=(-0.5, seq_len - 0.5, seq_len - 0.5, -0.5),
        gid="ownership",
    )
    _tile_lines(ax, sim)
    any_skipped = _draw_skipped(ax, sim)
    draw_boundaries(ax, sim, rows=True)
    written = _draw_labels(ax, sim, steps, fig)
    _ticks(ax, sim)
    handles = [Patch(color=rank_colour(r, sim.world), label=f"rank {r}") for r in range(sim.world)]
    packed = bool(boundaries(sim))
    why = " or ".join(["causal"] * sim.causal + ["other document"] * packed) or "causal"
    handles.append(Patch(facecolor=MASKED_COLOUR, edgecolor="0.6", label=f"masked ({why})"))
    if any_skipped:
        handles.append(
            Patch(
                facecolor="white",
                edgecolor=SKIPPED_EDGE,
                hatch=SKIPPED_HATCH,
                label="skipped: no visible pair, not computed",
            )
        )
    if packed:
        handles.append(Line2D([], [], color=DOCUMENT_COLOUR, linewidth=1.6, label="document edge"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.07),
        fontsize=8,
        ncol=len(handles) if len(handles) <= 5 else 4,
        frameon=False,
    )
    note = "number = the step of its compute event" if written else "(too many tiles to number)"
    usp = sim.method == "usp"
    heads = "\nusp: each rank computes its Hq/U heads of its group's queries" if usp else ""
    ax.set_title(
        f"Who computes each (query, key) pair\n{describe(sim)}\n"
        f"colour = the rank that owns the query, {note}{heads}",
        fontsize=8,
    )
    return fig
