"""Who computes which part of the S×S attention matrix, and at which ring step (ring family).

Axes in global token order (query i down, key j across), so zigzag and striped show their pattern.
Cell (i, j) has the colour of the rank that owns query i, if that rank has a forward compute event
on the block holding key j (``event.block``; under USP a block is the whole ulysses group's tokens,
so the ring index ``block // U`` names it); masked pairs are blank (white). Each rectangle of a
(query rank, key block) tile is labelled with the steps of those compute events.

What the artists carry (tests read these, not pixels):

- the matrix: the ``AxesImage`` with gid ``"ownership"``; its array (S, S) holds the computing rank
  of each cell, masked (NaN) where nothing is computed;
- a step label: a ``Text`` with gid ``"step:<query rank>:<block>:<n>"`` (n numbers the labels,
  so SVG ids stay unique) and the steps, comma-separated.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sptutor.plots._style import (
    MASKED_COLOUR,
    axes_for,
    check_method,
    describe,
    owners,
    rank_colormap,
    rank_colour,
    runs,
)

RING_FAMILY = ("rsa", "ring", "lss", "usp")
MOST_LABELS = 400  # beyond this many tile rectangles the numbers would not fit; they are left out
MOST_TICKS = 32  # a tick for every token up to this sequence length


def _steps(sim: Any) -> dict[tuple[int, int], list[int]]:
    """(rank, block) -> the sorted distinct steps of rank's forward compute events on block."""
    found: dict[tuple[int, int], set[int]] = defaultdict(set)
    for event in sim.ledger.events:
        if event.op == "compute" and event.phase == "forward" and event.block is not None:
            found[(event.rank, event.block)].add(event.step)
    return {key: sorted(steps) for key, steps in found.items()}


def _matrix(sim: Any, steps: dict[tuple[int, int], list[int]]) -> np.ndarray:
    """(S, S): the rank that computes (query i, key j), NaN where masked or never computed."""
    owner = owners(sim)  # (S,)
    ring_index = owner // sim.ulysses  # (S,) which block holds each key
    computes = np.zeros((sim.world, sim.world // sim.ulysses), dtype=bool)
    for rank, block in steps:
        computes[rank, block // sim.ulysses] = True
    seq_len = len(owner)
    visible = np.tril(np.ones((seq_len, seq_len), dtype=bool)) if sim.causal else True
    covered = computes[owner[:, None], ring_index[None, :]]  # (S, S)
    return np.where(visible & covered, owner[:, None].astype(float), np.nan)


def _block_tokens(sim: Any, block: int) -> np.ndarray:
    """The global positions of rank ``block``'s ulysses group (its own tokens when U = 1): the
    keys of its K/V block, and the queries it attends after Ulysses' all-to-all."""
    first = block // sim.ulysses * sim.ulysses
    return np.concatenate([sim.positions[r].numpy() for r in range(first, first + sim.ulysses)])


def _visible_centre(q_first, q_last, k_first, k_last, causal: bool) -> tuple[float, float]:
    """(x, y): the centre of the unmasked cells of rows q_first..q_last, keys k_first..k_last."""
    rows = np.arange(q_first, q_last + 1)  # (rows,)
    last_key = np.minimum(rows, k_last) if causal else np.full_like(rows, k_last)
    weights = np.clip(last_key - k_first + 1, 0, None)  # visible keys per row
    return (
        float((weights * (k_first + last_key) / 2).sum() / weights.sum()),
        float((weights * rows).sum() / weights.sum()),
    )


def _label_rectangles(sim: Any, steps) -> list[tuple[str, str, float, float, int]]:
    """(gid, text, x, y, size in cells) of each visible rectangle of each computed tile."""
    labels = []
    for (rank, block), tile_steps in sorted(steps.items()):
        text = ",".join(map(str, tile_steps))
        # under USP a rank attends the queries of its whole ulysses group (for H/U heads)
        for q_first, q_last in runs(_block_tokens(sim, rank)):
            for k_first, k_last in runs(_block_tokens(sim, block)):
                if sim.causal and q_last < k_first:
                    continue  # the whole rectangle is above the diagonal: masked
                x, y = _visible_centre(q_first, q_last, k_first, k_last, sim.causal)
                size = min(q_last - q_first, k_last - k_first) + 1
                labels.append((f"step:{rank}:{block}", text, x, y, size))
    return labels


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
    steps = _steps(sim)
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
    written = _draw_labels(ax, sim, steps, fig)
    _ticks(ax, sim)
    handles = [Patch(color=rank_colour(r, sim.world), label=f"rank {r}") for r in range(sim.world)]
    handles.append(Patch(facecolor=MASKED_COLOUR, edgecolor="0.6", label="masked (causal)"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.07),
        fontsize=8,
        ncol=min(len(handles), 5),
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
