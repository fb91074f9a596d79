"""``sptutor bench comm``: bytes each rank sends, measured from the oracle's ledger, next to
``sptutor.cost``'s closed form (equal, always) and the papers' formulas where they exist.

Multi-head attention (Hq = Hkv) in float32, so the papers' element counts, times 4 bytes, are
comparable with ours; causal (LASP's chain is the causal schedule). Per row: the bytes of the
busiest rank, forward + backward, over W = 2, 4, 8 ranks and a few sequence lengths S.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sptutor import console, cost
from sptutor.bench import common
from sptutor.methods import METHODS

SHAPE = cost.Shape(batch=1, seq_len=0, heads_q=8, heads_kv=8, head_dim=8, dtype=torch.float32)
WORLDS = (2, 4, 8)


@dataclass(frozen=True)
class Paper:
    """A paper's count of a method's traffic: the source, the formula in its notation and in
    ours, what it counts (``per rank``: the busiest rank's sent; ``all ranks``: their sum), and
    ``elements(shape, W)``, the formula's value in elements."""

    source: str
    theirs: str
    ours: str
    counts: str
    elements: Callable[[cost.Shape, int], float]

    def bytes(self, shape: cost.Shape, world: int) -> float:
        """The formula's value in bytes (elements times the inputs' itemsize)."""
        return self.elements(shape, world) * shape.itemsize


def _tokens_heads(shape: cost.Shape, world: int) -> int:
    """B·(S/W)·H·D: one rank's shard of a (B, S, H, D) tensor, in elements."""
    return shape.batch * shape.seq_len // world * shape.heads_q * shape.head_dim


def _state(shape: cost.Shape) -> int:
    """B·H·D²: one linear-attention state, in elements."""
    return shape.batch * shape.heads_q * shape.head_dim**2


PAPERS = {
    "rsa": Paper("Li et al. 2021, §3.2", "8(N−1)·B·Z·(L/N)·A", "8(W−1)·B·(S/W)·H·D", "per rank",
                 lambda s, w: 8 * (w - 1) * _tokens_heads(s, w)),
    "ring": Paper("USP v5 Table 2, SP-Ring", "4·O(bs·L·d)", "(6W−4)·B·(S/W)·H·D", "per rank",
                  lambda s, w: 4 * w * _tokens_heads(s, w)),
    "ulysses": Paper("USP v5 Table 2, SP-Ulysses", "(8/N)·O(bs·L·d)", "8(W−1)/W·B·(S/W)·H·D",
                     "per rank", lambda s, w: 8 * _tokens_heads(s, w)),
    "usp": Paper("USP v5 Table 2, SP-Unified", "≤ 4·O(bs·L·d)",
                 "(8(U−1)/U + 6R−4)·B·(S/W)·H·D, R>1", "per rank",
                 lambda s, w: 4 * w * _tokens_heads(s, w)),
    "lasp": Paper("LASP-2 §3.4 on LASP", "2(W−1)·B·H·d²", "2(W−1)·B·H·D²", "all ranks",
                  lambda s, w: 2 * (w - 1) * _state(s)),
    "lasp2": Paper("LASP-2 §3.4", "2·B·H·d²", "2(W−1)·B·H·D²", "per rank",
                   lambda s, w: 2 * _state(s)),
}  # fmt: skip
NOTES = (
    "sent: bytes of the busiest rank, forward + backward; all ranks: their sum. = cost: the "
    "ledger equals sptutor.cost exactly.",
    "ours/paper: ring 1.5 - 1/W (our backward sends K and V again besides dK and dV); ulysses "
    "(W-1)/W (the paper rounds it to 1);",
    "usp within the paper's bound; lasp2 W-1 (an all-gather puts W-1 states on each rank's "
    "wire; the paper counts one per step); lss: no published count.",
)


def rows(quick: bool = False) -> list[dict]:
    """One measured row per method, W and S (see :func:`sptutor.bench.common.measure`), with
    ``total`` (all ranks' bytes), ``paper`` (bytes of the paper's count, None without one) and
    ``compared`` (our figure the paper's counts: ``sent`` or ``total``)."""
    found = []
    for method in METHODS:
        for world in WORLDS:
            for seq_len in (16, 32) if quick else (16, 32, 64):
                shape = replace(SHAPE, seq_len=seq_len)
                row = common.measure(method, shape, world)
                row["total"] = sum(row["forward"]) + sum(row["backward"])
                paper = PAPERS.get(method)
                row["paper"] = paper.bytes(shape, world) if paper else None
                row["compared"] = "total" if paper and paper.counts == "all ranks" else "sent"
                found.append(row)
    return found


def _ratio(row: dict) -> str:
    return "-" if row["paper"] is None else f"{row[row['compared']] / row['paper']:.3f}"


def run(out: Path | None = None, quick: bool = False) -> int:
    """Print the formulas and the measured table; with ``out``, write comm.json and comm.png."""
    measured = rows(quick)
    console.say(f"bytes sent per rank, oracle ledger vs sptutor.cost, causal, "
                f"{common.describe(SHAPE)}, usp U=2 on even W")  # fmt: skip
    console.table(
        [(m, p.source, p.theirs, p.ours, p.counts) for m, p in PAPERS.items()],
        ("method", "paper", "their formula (elements)", "ours, MHA, 32-bit", "compared with"),
        title="The papers' counts: N = W ranks, L = S, Z = H heads, A = D, d = H·D, bs = B",
    )
    console.table(
        [(r["method"], r["world"], r["seq_len"], max(r["forward"]), max(r["backward"]), r["sent"],
          r["sent"] == r["cost_sent"], r["total"], _round(r["paper"]), _ratio(r))
         for r in measured],
        ("method", "W", "S", "fwd B", "bwd B", "sent B", "= cost", "all ranks B", "paper B",
         "ours/paper"),
        notes=NOTES,
    )  # fmt: skip
    figures = {"what": "comm", "shape": common.shape_dict(SHAPE), "causal": True,
               "papers": {m: {"source": p.source, "theirs": p.theirs, "ours": p.ours,
                              "counts": p.counts} for m, p in PAPERS.items()},
               "rows": measured}  # fmt: skip
    common.write(out, "comm", figures, lambda: draw(measured, "sent"))
    return 0 if all(r["sent"] == r["cost_sent"] for r in measured) else 1


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def draw(measured: list[dict], y: str):
    """Two panels of ``plots.cost_curves``: ``y`` against W at the largest S, against S at W=4."""
    from matplotlib.figure import Figure

    from sptutor import plots

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    by_world, by_seq = figure.subplots(1, 2)
    longest = max(r["seq_len"] for r in measured)
    plots.cost_curves([r for r in measured if r["seq_len"] == longest], x="world", y=y,
                      ax=by_world)  # fmt: skip
    plots.cost_curves([r for r in measured if r["world"] == 4], x="seq_len", y=y, ax=by_seq)
    by_world.set_title(f"S = {longest}")
    by_seq.set_title("W = 4")
    return figure
