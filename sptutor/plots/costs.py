"""Pictures of many calls: bytes per rank against W or S (one line per method), and the useful
work per rank under each layout (grouped bars), or of one call packed and as one document.

What the artists carry (tests read these, not pixels):

- a cost curve: a ``Line2D`` with gid ``"cost:<method>"`` (``"cost:<method>:<other>=<value>"``
  when the rows hold several values of the other variable), its points sorted by x;
- a bar: a ``Rectangle`` with gid ``"balance:<layout>:<rank>"`` and height = its ``macs``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from sptutor.plots._style import axes_for, format_bytes, format_count, method_colour, rank_colour

AXES = {"world": "W (ranks)", "seq_len": "S (tokens)"}
MEASURES = {
    "sent": "bytes sent per rank, forward + backward (max over ranks)",
    "saved": "bytes saved for backward per rank (max over ranks)",
}


def _lines(rows: list[dict], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """gid -> sorted (x, y) points: one line per method (and per value of the other variable
    when the rows hold several)."""
    other = "seq_len" if x == "world" else "world"
    several = len({row[other] for row in rows}) > 1
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        gid = f"cost:{row['method']}" + (f":{other}={row[other]}" if several else "")
        lines[gid].append((row[x], row[y]))
    return {gid: sorted(points) for gid, points in lines.items()}


def cost_curves(rows: list[dict[str, Any]], *, x: str, y: str, ax: Axes | None = None) -> Figure:
    """Bytes per rank against ``x`` ("world" or "seq_len"), ``y`` = "sent" or "saved", log-log.

    ``rows``: dicts with ``method``, ``world``, ``seq_len``, ``sent``, ``saved`` (bytes per rank,
    max over ranks). Returns ``ax``'s figure (a new one when ``ax`` is None).
    """
    if x not in AXES or y not in MEASURES:
        raise ValueError(
            f"x must be one of {list(AXES)} and y one of {list(MEASURES)}, got x={x!r}, y={y!r}"
        )
    if not rows:
        raise ValueError("cost_curves needs at least one row, got none")
    fig, ax = axes_for(ax, (7.0, 4.5))
    for gid, points in _lines(rows, x, y).items():
        method = gid.split(":")[1]
        xs, ys = zip(*points)
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=4,
            color=method_colour(method),
            gid=gid,
            label=gid.removeprefix("cost:").replace(":", " "),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_major_locator(LogLocator(base=4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(value)))
    ax.set_xlabel(AXES[x])
    ax.set_ylabel(MEASURES[y], fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fixed = "S" if x == "world" else "W"
    values = sorted({row["seq_len" if x == "world" else "world"] for row in rows})
    ax.set_title(
        f"{MEASURES[y].split(' (')[0]} against {AXES[x].split()[0]}"
        + (f" ({fixed}={values[0]})" if len(values) == 1 else ""),
        fontsize=9,
    )
    return fig


def busiest_over_idlest(values: list[int]) -> str:
    """max/min of ``values`` as text ("inf" when a rank does no work)."""
    low, high = min(values), max(values)
    return f"{high / low:.2f}" if low else ("1.00" if not high else "inf")


def balance(
    rows: list[dict[str, Any]], *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Useful MACs per rank, bars grouped by layout, max/min in each group's label.

    ``rows``: dicts with ``layout`` (any group name), ``rank``, ``macs``. ``title`` replaces the
    default one. Returns ``ax``'s figure (a new one when ``ax`` is None).
    """
    if not rows:
        raise ValueError("balance needs at least one row, got none")
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    world = max(row["rank"] for row in rows) + 1
    fig, ax = axes_for(ax, (max(2.0 + 0.5 * world * len(layouts), 6.0), 4.0))
    centres, names = [], []
    for index, layout in enumerate(layouts):
        group = sorted((row["rank"], row["macs"]) for row in rows if row["layout"] == layout)
        start = index * (world + 1)
        for rank, macs in group:
            ax.bar(
                start + rank,
                macs,
                width=0.85,
                color=rank_colour(rank, world),
                gid=f"balance:{layout}:{rank}",
            )
        centres.append(start + (world - 1) / 2)
        names.append(f"{layout}\nmax/min = {busiest_over_idlest([macs for _, macs in group])}")
    ax.set_xticks(centres, names, fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(value)))
    ax.set_ylabel("useful multiply-adds (MACs)")
    handles = [Patch(color=rank_colour(r, world), label=f"rank {r}") for r in range(world)]
    ax.legend(
        handles=handles,
        fontsize=7,
        ncol=min(world, 8),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        frameon=False,
    )
    default = (
        "Useful work per rank under each layout (each group: busiest / idlest rank; 1.00 = even)"
    )
    ax.set_title(title or default, fontsize=9)
    return fig


def work_rows(sim: Any, group: str) -> list[dict[str, Any]]:
    """:func:`balance`'s rows of one call: each rank's useful MACs, forward + backward, from the
    compute events of ``sim``'s ledger, under the group name ``group``."""
    return [{"layout": group, "rank": r, "macs": sim.ledger.macs(r)} for r in range(sim.world)]


def packed_group(sim: Any) -> str:
    """The name of ``sim``'s group of bars: ``"3 packed documents"``, or ``"one document"``."""
    offsets = getattr(sim, "cu_seqlens", None)
    count = 1 if offsets is None else len(offsets) - 1
    return "one document" if count == 1 else f"{count} packed documents"


def useful_work(sim: Any, *, baseline: Any = None, ax: Axes | None = None) -> Figure:
    """Each rank's useful MACs (forward + backward) in ``sim``, next to those of ``baseline``
    (the same call on one document, when given): packing documents masks the pairs across them,
    which changes who has work. Bars as :func:`balance` (gids ``"balance:<group>:<rank>"``)."""
    rows = work_rows(sim, packed_group(sim))
    if baseline is not None:
        rows += work_rows(baseline, packed_group(baseline) + " (no packing)")
    mask = "causal" if sim.causal else "no causal mask"
    return balance(
        rows,
        ax=ax,
        title=f"Useful work per rank, {sim.method} · {sim.layout} · {mask}\n"
        "(each group: busiest / idlest rank; 1.00 = even)",
    )
