"""``for_simulation``: what ``sptutor trace`` draws, the schedule over the method's own pictures."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from sptutor.methods import LINEAR_METHODS
from sptutor.plots.block_work import block_work
from sptutor.plots.costs import useful_work
from sptutor.plots.heads_and_tokens import ULYSSES_FAMILY, heads_and_tokens
from sptutor.plots.ownership import RING_FAMILY, ownership
from sptutor.plots.schedule import schedule
from sptutor.plots.state_chain import state_chain


def pictures_of(method: str, *, packed: bool = False) -> list:
    """The method's own pictures, drawn under its schedule: ownership for the ring family,
    heads_and_tokens for ulysses (usp gets both), state_chain for lasp and lasp2. A call on
    ``packed`` documents adds block_work (ring family: the blocks it skips) and useful_work."""
    found = []
    if method in RING_FAMILY:
        found.append(ownership)
    if method in ULYSSES_FAMILY:
        found.append(heads_and_tokens)
    if method in LINEAR_METHODS:
        found.append(state_chain)
    if packed and method in RING_FAMILY:
        found.append(block_work)
    if packed:
        found.append(useful_work)
    return found


def for_simulation(sim: Any, *, baseline: Any = None) -> Figure:
    """One figure for ``sim``: its schedule on top (full width), its own pictures below, side by
    side (axes in that order: ``fig.axes[0]`` is the schedule). On packed documents
    (``sim.cu_seqlens``) the useful work per rank comes last, next to ``baseline``'s (the same
    call on one document) when given."""
    from matplotlib import pyplot as plt

    below = pictures_of(sim.method, packed=getattr(sim, "cu_seqlens", None) is not None)
    columns = max(1, len(below))
    fig = plt.figure(
        figsize=(max(14.0, 7.0 * columns), 5.0 + 0.5 * sim.world + 6.5), layout="constrained"
    )
    grid = fig.add_gridspec(2, columns, height_ratios=[2.2 + 0.5 * sim.world, 6.5])
    schedule(sim, ax=fig.add_subplot(grid[0, :]))
    for column, picture in enumerate(below):
        options = {"baseline": baseline} if picture is useful_work else {}
        picture(sim, ax=fig.add_subplot(grid[1, column]), **options)
    return fig
