"""Pictures of a simulated call, drawn from its ledger: the schedule, who computes which part of
the attention matrix (with packed documents' edges), which K/V blocks each rank computes or skips,
who holds which heads, the linear-attention state's journey; the cost curves and load balance of
many calls, and the useful work per rank of one.

Every function returns a ``matplotlib.figure.Figure`` and takes an optional ``ax=`` to draw into
(it then returns ``ax.figure``). Importing this package picks no backend; a new figure comes from
``pyplot``, so it shows in a notebook and closes with ``plt.close(fig)``. Save one with
``fig.savefig("trace.png")`` (or ``.svg``).
"""

from sptutor.plots.block_work import block_work
from sptutor.plots.costs import balance, cost_curves, useful_work
from sptutor.plots.heads_and_tokens import heads_and_tokens
from sptutor.plots.overview import for_simulation
from sptutor.plots.ownership import ownership
from sptutor.plots.schedule import schedule
from sptutor.plots.state_chain import state_chain

__all__ = [
    "balance",
    "block_work",
    "cost_curves",
    "for_simulation",
    "heads_and_tokens",
    "ownership",
    "schedule",
    "state_chain",
    "useful_work",
]
