"""Who holds which (query head, token) before and after Ulysses' sequence -> heads all-to-all.

Before (top): sequence-sharded, each rank holds every head of its own tokens. After (bottom):
head-sharded, rank ``u`` of a ulysses group of U ranks holds heads ``u·Hq/U .. (u+1)·Hq/U - 1`` of
all its group's tokens (Ulysses: the group is the whole world; USP: U contiguous ranks). Tokens run
across in global order, heads down; colours are ranks; dark lines (gids ``"document:<p>:before"``
and ``"document:<p>:after"``) mark where a packed document starts.

What the artists carry (tests read these, not pixels):

- the two ``AxesImage`` with gids ``"before"`` and ``"after"``: arrays (Hq, S), entry [h, i] the
  rank holding head h of token i;
- the arrow between them: a ``FancyArrowPatch`` with gid ``"all_to_all:forward"`` and label the
  bytes each rank puts on the wire in the all-to-alls before its first compute (max over ranks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Patch

from sptutor.plots import _events
from sptutor.plots._style import (
    axes_for,
    check_method,
    describe,
    draw_boundaries,
    format_bytes,
    owners,
    rank_colormap,
    rank_colour,
)

ULYSSES_FAMILY = ("ulysses", "usp")
GAP = 2.0  # rows of space between the two panels, for the arrow
MOST_NUMBERED = 512  # cells per panel up to which each cell also shows its rank's number


def holders(sim: Any) -> tuple[np.ndarray, np.ndarray]:
    """(before, after), each (Hq, S): the rank holding head h of token i, before and after the
    sequence -> heads all-to-all of ``sim`` (ulysses or usp)."""
    heads_q, degree = sim.shape[2], _degree(sim)
    owner = owners(sim)  # (S,)
    before = np.broadcast_to(owner, (heads_q, len(owner)))  # (Hq, S)
    group_first = owner // degree * degree  # (S,) the first rank of each token's group
    head_group = np.arange(heads_q) // (heads_q // degree)  # (Hq,) which member holds head h
    return before.copy(), group_first[None, :] + head_group[:, None]


def _degree(sim: Any) -> int:
    """U: the ranks one all-to-all spans (the whole world for ulysses)."""
    return sim.world if sim.method == "ulysses" else sim.ulysses


def _first_all_to_all(sim: Any) -> tuple[int, int]:
    """(calls, bytes): the forward all-to-alls each rank makes before it first computes, and
    the most bytes any rank puts on the wire in them."""
    calls, most = 0, 0
    for events in _events.per_rank(sim.ledger.events, "forward").values():
        first = next((i for i, e in enumerate(events) if e.op == "compute"), len(events))
        sent = [e for e in events[:first] if e.op == "all_to_all"]
        calls, most = max(calls, len(sent)), max(most, sum(e.nbytes for e in sent))
    return calls, most


def _panel(ax: Axes, sim: Any, ranks: np.ndarray, top: float, gid: str, title: str) -> None:
    heads_q, seq_len = ranks.shape
    ax.imshow(
        ranks,
        cmap=rank_colormap(sim.world),
        vmin=-0.5,
        vmax=sim.world - 0.5,
        alpha=0.85,
        interpolation="nearest",
        aspect="auto",
        extent=(-0.5, seq_len - 0.5, top + heads_q - 0.5, top - 0.5),
        gid=gid,
    )
    ax.text(-0.5, top - 0.7, title, fontsize=8, va="bottom")
    if ranks.size <= MOST_NUMBERED:
        for (head, token), rank in np.ndenumerate(ranks):
            ax.text(token, top + head, str(rank), ha="center", va="center", fontsize=6)
    for token in np.flatnonzero(ranks[0, 1:] != ranks[0, :-1]):  # a new owner starts here
        ax.plot([token + 0.5] * 2, [top - 0.5, top + heads_q - 0.5], color="white", linewidth=1)
    for head in np.flatnonzero(ranks[1:, 0] != ranks[:-1, 0]):  # a new head group starts here
        ax.plot([-0.5, seq_len - 0.5], [top + head + 0.5] * 2, color="white", linewidth=1)
    draw_boundaries(ax, sim, rows=False, span=(top - 0.5, top + heads_q - 0.5), tag=f":{gid}")


def heads_and_tokens(sim: Any, *, ax: Axes | None = None) -> Figure:
    """Who holds which (head, token) of ``sim`` (ulysses or usp), before and after the first
    all-to-all. Returns ``ax``'s figure (a new one when ``ax`` is None); ValueError otherwise."""
    check_method(sim, ULYSSES_FAMILY, "heads_and_tokens")
    heads_q, seq_len, degree = sim.shape[2], sim.shape[1], _degree(sim)
    fig, ax = axes_for(ax, (min(max(3.0 + 0.3 * seq_len, 6.0), 30.0), 2.5 + 0.5 * heads_q))
    before, after = holders(sim)
    _panel(
        ax,
        sim,
        before,
        0.0,
        "before",
        "before: sequence-sharded (each rank: all heads of its tokens)",
    )
    second = heads_q + GAP
    _panel(
        ax,
        sim,
        after,
        second,
        "after",
        f"after: head-sharded (each rank: Hq/U = {heads_q // degree} heads of its group's tokens)",
    )
    calls, nbytes = _first_all_to_all(sim)
    label = format_bytes(nbytes)
    middle = seq_len / 2 - 0.5
    ax.add_patch(
        FancyArrowPatch(
            (middle, heads_q - 0.3),
            (middle, second - 0.9),
            arrowstyle="-|>",
            mutation_scale=12,
            color="0.3",
            gid="all_to_all:forward",
            label=label,
        )
    )
    ax.text(
        middle + 0.4,
        (heads_q + second) / 2 - 0.6,
        f"sequence → heads: {calls} all-to-all{'s' * (calls != 1)}, {label} sent per rank",
        fontsize=8,
        va="center",
    )
    ax.set_ylim(second + heads_q - 0.5, -1.5)
    ax.set_xlim(-0.5, seq_len - 0.5)
    ax.set_yticks(
        [*range(heads_q), *(second + h for h in range(heads_q))],
        [f"h{h}" for h in range(heads_q)] * 2,
        fontsize=6,
    )
    ax.set_xlabel("token (global position)")
    ax.set_ylabel("query head")
    handles = [Patch(color=rank_colour(r, sim.world), label=f"rank {r}") for r in range(sim.world)]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        fontsize=8,
        ncol=min(sim.world, 8),
        frameon=False,
    )
    ax.set_title(f"Who holds which (head, token): {describe(sim)}", fontsize=8)
    return fig
