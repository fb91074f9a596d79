"""``sptutor trace``: one simulated call of a method, shown as its schedule.

The oracle runs the call on small seeded float64 inputs and logs every event of every rank: what
each rank sends to whom (bytes), which collective it joins (bytes it puts on the wire), which
block it computes (useful multiply-adds). The terminal gets one table per phase, a row per rank
and a column per event in that rank's own order; ``--out`` draws ``sptutor.plots.for_simulation``
into a PNG or SVG file instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sptutor import checks, console, cost, layout
from sptutor.ledger import PHASES, CommEvent
from sptutor.mesh import check_mesh_sizes
from sptutor.methods import LINEAR_METHODS, METHODS

SIZES = ("world", "seq_len", "heads_q", "heads_kv", "head_dim")
SUFFIXES = (".png", ".svg")


@dataclass(frozen=True)
class TraceConfig:
    """One call to trace: the method, W ranks, the layout, (B=1, S, Hq, Hkv, D) float64 inputs;
    ``ulysses`` is usp's U (default 2); ``forward_only`` leaves the backward out."""

    method: str
    world: int = 4
    layout: str = "contiguous"
    causal: bool = False
    ulysses: int | None = None
    seq_len: int = 16
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 8
    forward_only: bool = False

    @property
    def degree(self) -> int | None:
        """U: ``ulysses`` if set, else 2 for usp; None for the other methods."""
        if self.method != "usp":
            return None
        return 2 if self.ulysses is None else self.ulysses

    def check(self) -> None:
        """Raise ``ValueError`` with the library's sentence unless the oracle can run this call,
        in the order the oracle would find it."""
        for name in (*SIZES, "ulysses"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "usp" and self.ulysses is not None:
            raise ValueError(f"only usp has a Ulysses degree, got ulysses={self.ulysses}")
        if self.method == "usp":
            check_mesh_sizes(self.degree, self.world // self.degree, self.world)
        one_token_q = torch.zeros(1, 1, self.heads_q, 1)  # (B, S, Hq, D): only the heads matter
        one_token_kv = torch.zeros(1, 1, self.heads_kv, 1)
        checks.check_qkv(one_token_q, one_token_kv, one_token_kv)
        heads_split_over = {"ulysses": self.world, "usp": self.degree}.get(self.method)
        if heads_split_over:
            checks.check_ulysses_heads(self.heads_q, self.heads_kv, heads_split_over)
        if self.method in LINEAR_METHODS:
            checks.check_linear_layout(self.layout)
        layout.check_layout(self.seq_len, world=self.world, layout=self.layout,
                            ulysses=self.degree or 1)  # fmt: skip

    @property
    def shape(self) -> cost.Shape:
        return cost.Shape(1, self.seq_len, self.heads_q, self.heads_kv, self.head_dim,
                          torch.float64)  # fmt: skip


def check_out(path: Path | None) -> None:
    """``--out`` must name a .png or .svg file (the picture's format comes from the suffix)."""
    if path is not None and path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out must end in .png or .svg, got {str(path)!r}")


def simulate(config: TraceConfig):
    """Check ``config``, then run the oracle on seeded float64 inputs; returns the Simulation."""
    from sptutor import oracle
    from sptutor.bench.common import inputs

    config.check()
    q, k, v, dout = inputs(config.shape)
    return oracle.simulate(config.method, q, k, v, None if config.forward_only else dout,
                           world=config.world, causal=config.causal, layout=config.layout,
                           ulysses=config.degree)  # fmt: skip


def describe_event(event: CommEvent, world: int) -> str:
    """Two lines: what the event is, and its bytes (or MACs). ``send → 2 / 512 B``."""
    if event.op == "send":
        return f"send → {event.peer}\n{event.nbytes:,} B"
    if event.op == "compute":
        block = "" if event.block is None else f" block {event.block}"
        return f"compute{block}\n{event.macs:,} MACs"
    group = event.group or ()
    among = "" if len(group) in (0, world) else f" of {','.join(map(str, group))}"
    return f"{event.op}{among}\n{event.nbytes:,} B"


def schedule_rows(sim, phase: str) -> list[list[str]]:
    """Per rank, the descriptions of its events of ``phase`` in its own order (``seq``)."""
    lanes: list[list[CommEvent]] = [[] for _ in range(sim.world)]
    for event in sim.ledger.events:
        if event.phase == phase:
            lanes[event.rank].append(event)
    return [[describe_event(e, sim.world) for e in sorted(lane, key=lambda e: e.seq)]
            for lane in lanes]  # fmt: skip


def token_runs(positions: torch.Tensor) -> str:
    """Global positions as runs: ``0-1,14-15``."""
    values, runs = positions.tolist(), []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def title(sim) -> str:
    """``ring on W=4 ranks, contiguous layout, causal; B=1 S=16 Hq=4 Hkv=2 D=8 float64``."""
    batch, seq_len, heads_q, heads_kv, head_dim = sim.shape
    mesh = f" (U={sim.ulysses} x R={sim.world // sim.ulysses})" if sim.method == "usp" else ""
    mask = "causal" if sim.causal else "not causal"
    return (f"{sim.method} on W={sim.world} ranks{mesh}, {sim.layout} layout, {mask}; "
            f"B={batch} S={seq_len} Hq={heads_q} Hkv={heads_kv} D={head_dim} float64")  # fmt: skip


EVENTS_PER_TABLE = 3  # event cells are up to ~28 characters wide


def show(sim) -> None:
    """Print the call's schedule, one table per phase, and each rank's totals."""
    console.say(title(sim))
    for phase in PHASES:
        lanes = schedule_rows(sim, phase)
        width = max(len(lane) for lane in lanes)
        if width == 0:
            continue
        padded = [[*lane, *[""] * (width - len(lane))] for lane in lanes]
        # a few events per table, so that a table fits a terminal of 100 columns
        for first in range(0, width, EVENTS_PER_TABLE):
            last = min(first + EVENTS_PER_TABLE, width)
            rows = [[rank, *lane[first:last]] for rank, lane in enumerate(padded)]
            columns = ("rank", *(f"event {i}" for i in range(first + 1, last + 1)))
            console.table(rows, columns, title=f"{phase}, events {first + 1}-{last} of {width}:"
                          " each rank's events in its own order")  # fmt: skip
    totals = [(rank, token_runs(sim.positions[rank]), sim.ledger.bytes_sent(rank, "forward"),
               sim.ledger.bytes_sent(rank, "backward"), record.saved_bytes,
               sim.ledger.macs(rank)) for rank, record in enumerate(sim.ranks)]  # fmt: skip
    legend = "B: bytes put on the wire (sent) or kept for backward (saved); MACs: useful work."
    console.table(totals, ("rank", "tokens", "fwd B", "bwd B", "saved B", "useful MACs"),
                  title="per rank", notes=(legend,))  # fmt: skip


def draw(sim, path: Path) -> None:
    """Write ``plots.for_simulation(sim)`` to ``path`` (.png or .svg), on the Agg backend."""
    from sptutor import plots

    console.save_figure(lambda: plots.for_simulation(sim), path)
    console.say(f"wrote {path}", style="green")


def run(config: TraceConfig, out: Path | None = None) -> int:
    """Check, simulate, then print the schedule or (with ``out``) draw it. Returns 0."""
    check_out(out)
    sim = simulate(config)
    if out is None:
        show(sim)
    else:
        draw(sim, out)
    return 0
