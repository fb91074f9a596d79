"""``for_simulation``: what ``sptutor trace`` draws, the schedule over the method's own pictures."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from sptutor.methods import LINEAR_METHODS
from sptutor.plots.heads_and_tokens import ULYSSES_FAMILY, heads_and_tokens
from sptutor.plots.ownership import RING_FAMILY, ownership
from sptutor.plots.schedule import schedule
from sptutor.plots.state_chain import state_chain


def pictures_of(method: str) -> list:
    """The method's own pictures, drawn under its schedule: ownership for the ring family,
    heads_and_tokens for ulysses (usp gets both), state_chain for lasp and lasp2."""
    found = []
    if method in RING_FAMILY:
        found.append(ownership)
    if method in ULYSSES_FAMILY:
        found.append(heads_and_tokens)
    if method in LINEAR_METHODS:
        found.append(state_chain)
    return found


def for_simulation(sim: Any) -> Figure:
    """One figure for ``sim``: its schedule on top (full width), its own pictures below, side by
    side (axes in that order: ``fig.axes[0]`` is the schedule)."""
    from matplotlib import pyplot as plt

    below = pictures_of(sim.method)
    columns = max(1, len(below))
    fig = plt.figure(
        figsize=(max(14.0, 7.0 * columns), 5.0 + 0.5 * sim.world + 6.5), layout="constrained"
    )
    grid = fig.add_gridspec(2, columns, height_ratios=[2.2 + 0.5 * sim.world, 6.5])
    schedule(sim, ax=fig.add_subplot(grid[0, :]))
    for column, picture in enumerate(below):
        picture(sim, ax=fig.add_subplot(grid[1, column]))
    return fig
