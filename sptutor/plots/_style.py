"""What every picture shares: one colour per rank, one per method, bytes as B/KiB/MiB, titles.

Nothing here picks a matplotlib backend: pyplot is imported only when a picture makes a new figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure

from sptutor import layout
from sptutor.methods import METHODS

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
# collective bands are grey; the hatch tells the op apart (the rank colours stay for the ranks)
HATCHES = {"all_to_all": "x", "all_gather": "/", "reduce_scatter": "\\", "all_reduce": "+"}
OP_NAMES = {
    "send": "send",
    "all_to_all": "all-to-all",
    "all_gather": "all-gather",
    "reduce_scatter": "reduce-scatter",
    "all_reduce": "all-reduce",
}
BAND_COLOUR = "0.9"
BAND_EDGE = "0.6"  # the hatch is drawn in the edge colour: light, so the labels read
MASKED_COLOUR = "white"
DOCUMENT_COLOUR = "0.1"  # document boundaries: dark lines over the rank colours
SKIPPED_HATCH = "////"  # a block with no visible pair, hence no compute event


def rank_colour(rank: int, world: int) -> tuple[float, float, float, float]:
    """The colour of ``rank`` in every picture of a ``world``-rank call (qualitative colormap)."""
    palette = colormaps["tab10" if world <= 10 else "tab20"]
    return to_rgba(palette(rank % palette.N))


def rank_colormap(world: int) -> ListedColormap:
    """A colormap whose integer value r is :func:`rank_colour` (r); NaN cells are white."""
    cmap = ListedColormap([rank_colour(r, world) for r in range(world)], name="sptutor-ranks")
    return cmap.with_extremes(bad=MASKED_COLOUR)


def method_colour(method: str) -> tuple[float, float, float, float]:
    """The colour of a method in the cost pictures (Dark2, in the order of ``METHODS``)."""
    index = METHODS.index(method) if method in METHODS else len(METHODS)
    return to_rgba(colormaps["Dark2"](index % 8))


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, three significant digits, exact below 1 KiB."""
    value, unit = float(nbytes), 0
    while abs(value) >= 1024 and unit < len(BYTE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{int(nbytes)} B"
    return f"{value:.3g} {BYTE_UNITS[unit]}"


def format_count(count: float) -> str:
    """``123456`` -> ``"123k"``: a count (MACs) with an SI suffix, three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.3g}"


def describe(sim: Any) -> str:
    """``"ring · W=4 · zigzag · causal"``: the call a picture shows (USP adds ``U×R``)."""
    parts = [sim.method, f"W={sim.world}"]
    if sim.method == "usp":
        parts.append(f"U={sim.ulysses}×R={sim.world // sim.ulysses}")
    parts += [sim.layout, "causal" if sim.causal else "not causal"]
    batch, seq_len, heads_q, heads_kv, head_dim = sim.shape
    parts.append(f"B={batch} S={seq_len} Hq={heads_q} Hkv={heads_kv} D={head_dim}")
    offsets = getattr(sim, "cu_seqlens", None)
    if offsets is not None:
        count = len(offsets) - 1
        parts.append(f"{count} packed document{'s' * (count != 1)}")
    return " · ".join(parts)


def documents(sim: Any) -> np.ndarray | None:
    """(S,) int array: the document of each global token (from ``sim.cu_seqlens``, (N+1,)
    offsets), or None when the call has one document."""
    offsets = getattr(sim, "cu_seqlens", None)
    if offsets is None:
        return None
    return layout.document_ids(offsets.cpu(), torch.arange(sim.shape[1])).numpy()


def boundaries(sim: Any) -> list[int]:
    """The global positions where a new document starts, 0 and S left out (none for one
    document): a boundary at p lies between tokens p-1 and p."""
    offsets = getattr(sim, "cu_seqlens", None)
    if offsets is None:
        return []
    return sorted({int(p) for p in offsets.tolist() if 0 < int(p) < sim.shape[1]})


def draw_boundaries(
    ax: Axes, sim: Any, *, rows: bool, span: tuple[float, float] | None = None, tag: str = ""
) -> None:
    """Dark lines between documents, along the token axis x (and y too when ``rows``): each a
    ``Line2D`` with gid ``"document:<p><tag>"`` (``"document-row:<p><tag>"`` across), p its first
    token (``tag`` keeps SVG ids unique when one axes draws them twice). ``span``: (low, high)
    of the other axis the vertical lines cover (None: all of it)."""
    style = {"color": DOCUMENT_COLOUR, "linewidth": 1.6, "zorder": 3}
    for first in boundaries(sim):
        where = first - 0.5
        if span is None:
            ax.axvline(where, gid=f"document:{first}{tag}", **style)
        else:
            ax.plot([where] * 2, span, gid=f"document:{first}{tag}", **style)
        if rows:
            ax.axhline(where, gid=f"document-row:{first}{tag}", **style)


def owners(sim: Any) -> np.ndarray:
    """(S,) int array: the rank that owns each global token (from ``sim.positions``)."""
    owner = np.empty(sim.shape[1], dtype=int)
    for rank, positions in enumerate(sim.positions):
        owner[positions.numpy()] = rank
    return owner


def runs(values) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive integers: [0, 1, 3] -> [(0, 1), (3, 3)]."""
    found: list[list[int]] = []
    for value in sorted(int(v) for v in values):
        if found and value == found[-1][1] + 1:
            found[-1][1] = value
        else:
            found.append([value, value])
    return [(first, last) for first, last in found]


def axes_for(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new figure of ``size`` inches (pyplot imported only here)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib import pyplot as plt

    fig, new_ax = plt.subplots(figsize=size, layout="constrained")
    return fig, new_ax


def check_method(sim: Any, allowed: tuple[str, ...], picture: str) -> None:
    """ValueError naming the methods ``picture`` draws, unless ``sim.method`` is one of them."""
    if sim.method not in allowed:
        raise ValueError(
            f"the {picture} picture is for {', '.join(allowed)}; got method={sim.method!r}"
        )
