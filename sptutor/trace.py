"""``sptutor trace``: one simulated call of a method, shown as its schedule.

The oracle runs the call on small seeded float64 inputs and logs every event of every rank: what
each rank sends to whom (bytes), which collective it joins (bytes it puts on the wire), which
block it computes (useful multiply-adds). The terminal gets one table per phase, a row per rank
and a column per event in that rank's own order; ``--out`` draws ``sptutor.plots.for_simulation``
into a PNG or SVG file instead. Any S >= W works (shards then differ by one token), and
``cu_seqlens`` packs documents: the trace then shows which documents each rank holds, which K/V
blocks no rank computes because no query shares a document with their keys, and the useful work
per rank next to the same call on one document.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sptutor import chain, checks, console, cost, layout
from sptutor.ledger import PHASES, CommEvent
from sptutor.mesh import check_mesh_sizes
from sptutor.methods import LINEAR_METHODS, METHODS

SIZES = ("world", "seq_len", "heads_q", "heads_kv", "head_dim")
SUFFIXES = (".png", ".svg")


DEFAULT_SEQ_LEN = 16


@dataclass(frozen=True)
class TraceConfig:
    """One call to trace: the method, W ranks, the layout, (B=1, S, Hq, Hkv, D) float64 inputs;
    ``ulysses`` is usp's U (default 2); ``forward_only`` leaves the backward out. ``cu_seqlens``:
    the (N+1,) global offsets of packed documents (0 first, S last); ``seq_len`` S defaults to
    its last offset (16 without documents) and, when given too, must equal it."""

    method: str
    world: int = 4
    layout: str = "contiguous"
    causal: bool = False
    ulysses: int | None = None
    seq_len: int | None = None
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 8
    forward_only: bool = False
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        """S: ``seq_len`` if given, else the last offset of ``cu_seqlens``, else 16."""
        if self.seq_len is not None:
            return self.seq_len
        return self.cu_seqlens[-1] if self.cu_seqlens else DEFAULT_SEQ_LEN

    @property
    def offsets(self) -> torch.Tensor | None:
        """``cu_seqlens`` as the LongTensor (N+1,) the oracle takes, or None."""
        return None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens, dtype=torch.long)

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
        if self.cu_seqlens is not None:
            last = self.cu_seqlens[-1] if self.cu_seqlens else None
            if self.seq_len is not None and last is not None and last != self.seq_len:
                raise ValueError(
                    f"seq_len={self.seq_len} but cu_seqlens ends at {last}: its last offset is S "
                    f"(leave seq_len out, or give the same S)"
                )
            layout.check_cu_seqlens(self.offsets, self.length)
        if self.method in LINEAR_METHODS:
            chain.check_documents(self.method, self.causal, self.cu_seqlens is not None)
        layout.check_layout(self.length, world=self.world, layout=self.layout,
                            ulysses=self.degree or 1)  # fmt: skip

    @property
    def shape(self) -> cost.Shape:
        return cost.Shape(1, self.length, self.heads_q, self.heads_kv, self.head_dim,
                          torch.float64)  # fmt: skip


def parse_cu_seqlens(text: str) -> tuple[int, ...]:
    """``"0,5,17,32"`` -> ``(0, 5, 17, 32)``; ValueError unless comma-separated integers (whether
    they make documents is :meth:`TraceConfig.check`'s to say)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--cu-seqlens must be comma-separated integers such as 0,5,17,32, got {text!r}"
        ) from None


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
    packed = {} if config.cu_seqlens is None else {"cu_seqlens": config.offsets}
    return oracle.simulate(config.method, q, k, v, None if config.forward_only else dout,
                           world=config.world, causal=config.causal, layout=config.layout,
                           ulysses=config.degree, **packed)  # fmt: skip


def one_document(config: TraceConfig) -> TraceConfig:
    """The same call without packing: one document of the same S tokens."""
    return replace(config, seq_len=config.length, cu_seqlens=None)


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


def document_runs(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> str:
    """A rank's tokens by document: positions (S_r,), cu_seqlens (N+1,) -> ``d0 0-4; d1 5-7``."""
    docs = layout.document_ids(cu_seqlens, positions)  # (S_r,)
    return "; ".join(f"d{n} {token_runs(positions[docs == n])}" for n in docs.unique().tolist())


def title(sim) -> str:
    """``ring on W=4 ranks, contiguous layout, causal; B=1 S=16 Hq=4 Hkv=2 D=8 float64`` (and
    ``; 3 packed documents``)."""
    batch, seq_len, heads_q, heads_kv, head_dim = sim.shape
    mesh = f" (U={sim.ulysses} x R={sim.world // sim.ulysses})" if sim.method == "usp" else ""
    mask = "causal" if sim.causal else "not causal"
    count = None if sim.cu_seqlens is None else len(sim.cu_seqlens) - 1
    packed = "" if count is None else f"; {count} packed document{'s' * (count != 1)}"
    return (f"{sim.method} on W={sim.world} ranks{mesh}, {sim.layout} layout, {mask}; "
            f"B={batch} S={seq_len} Hq={heads_q} Hkv={heads_kv} D={head_dim} float64"
            f"{packed}")  # fmt: skip


def block_rows(sim) -> list[list]:
    """Per rank (ring family): the K/V blocks it computes in the forward, and those it skips, by
    reason (``plots._blocks.skip_reason``): causal, documents, otherwise not computed."""
    from sptutor.plots import _blocks

    computed, rows = _blocks.forward_macs(sim), []
    reasons = {(r, b): _blocks.skip_reason(sim, r, b) for r, b in _blocks.skipped(sim)}
    for rank in range(sim.world):
        mine = [b for r, b in _blocks.candidates(sim) if r == rank]
        cells = [[b for b in mine if (rank, b) in computed]]
        cells += [[b for b in mine if reasons.get((rank, b)) == why] for why in _blocks.REASONS]
        rows.append([rank, *(",".join(map(str, c)) or "-" for c in cells)])
    return rows


def _show_documents(sim) -> None:
    offsets = sim.cu_seqlens.tolist()
    lengths = ", ".join(str(b - a) for a, b in itertools.pairwise(offsets))
    rows = [[rank, token_runs(p), document_runs(p, sim.cu_seqlens)]
            for rank, p in enumerate(sim.positions)]  # fmt: skip
    console.table(rows, ("rank", "tokens", "tokens by document (d<n>: document n)"),
                  title=f"documents: cu_seqlens = {','.join(map(str, offsets))}",
                  notes=(f"{len(offsets) - 1} documents of {lengths} tokens; a query sees only "
                         "keys of its own document.",))  # fmt: skip


def _show_blocks(sim) -> None:
    rows = block_rows(sim)
    columns = ["rank", "computes", "skips: causal", "skips: documents", "skips, visible!"]
    keep = [i for i in range(len(columns)) if i < 3 or any(row[i] != "-" for row in rows)]
    if sim.cu_seqlens is not None:
        keep = sorted({*keep, 3})
    notes = ["a block is skipped when none of its (query, key) pairs is visible: no compute event."]
    notes += ["usp: a rank's blocks are those of its ring group."] * (sim.ulysses > 1)
    console.table([[row[i] for i in keep] for row in rows], [columns[i] for i in keep],
                  title="K/V blocks each rank computes in the forward (backward: the same)",
                  notes=notes)  # fmt: skip


EVENTS_PER_TABLE = 3  # event cells are up to ~28 characters wide


def show(sim, baseline=None) -> None:
    """Print the call's schedule, one table per phase, each rank's documents (packed), the K/V
    blocks each rank computes or skips (ring family), and each rank's totals; ``baseline``: the
    same call on one document, whose useful work the totals compare."""
    from sptutor.plots._blocks import BLOCK_METHODS
    from sptutor.plots.costs import busiest_over_idlest

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
    if sim.cu_seqlens is not None:
        _show_documents(sim)
    if sim.method in BLOCK_METHODS:
        _show_blocks(sim)
    totals = [(rank, token_runs(sim.positions[rank]), sim.ledger.bytes_sent(rank, "forward"),
               sim.ledger.bytes_sent(rank, "backward"), record.saved_bytes,
               sim.ledger.macs(rank)) for rank, record in enumerate(sim.ranks)]  # fmt: skip
    legend = "B: bytes put on the wire (sent) or kept for backward (saved); MACs: useful work."
    ratios = [busiest_over_idlest([s.ledger.macs(r) for r in range(s.world)])
              for s in (sim, baseline) if s is not None]  # fmt: skip
    balance = f"useful MACs, busiest / idlest rank: {ratios[0]}"
    if baseline is not None:
        balance += f" (the same call on one document: {ratios[1]})"
    console.table(totals, ("rank", "tokens", "fwd B", "bwd B", "saved B", "useful MACs"),
                  title="per rank", notes=(legend, balance))  # fmt: skip


def draw(sim, path: Path, baseline=None) -> None:
    """Write ``plots.for_simulation(sim, baseline=baseline)`` to ``path`` (.png or .svg), on the
    Agg backend."""
    from sptutor import plots

    console.save_figure(lambda: plots.for_simulation(sim, baseline=baseline), path)
    console.say(f"wrote {path}", style="green")


def run(config: TraceConfig, out: Path | None = None) -> int:
    """Check, simulate (packed documents: also on one document, to compare the useful work),
    then print the schedule or (with ``out``) draw it. Returns 0."""
    check_out(out)
    sim = simulate(config)
    baseline = None if config.cu_seqlens is None else simulate(one_document(config))
    if out is None:
        show(sim, baseline)
    else:
        draw(sim, out, baseline)
    return 0
