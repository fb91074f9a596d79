"""The ledger: every message a method sends, and what it costs on the wire.

See Design, *The ledger*, for the rules.

The oracle writes one ``Ledger`` per simulation; the real code logs into whatever ledgers are open
with :func:`record`. Both count bytes with :func:`wire_bytes`, so they agree whatever a backend
does inside a collective.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

OPS = ("send", "all_to_all", "all_gather", "reduce_scatter", "all_reduce", "compute")
PHASES = ("forward", "backward")


@dataclass(frozen=True)
class CommEvent:
    """One tensor put on the wire by one rank (or one block of compute, ``op="compute"``).

    ``rank``/``peer`` are global ranks (``peer`` is None for collectives and compute); ``nbytes`` is
    what ``rank`` sends under the bandwidth-optimal algorithm; ``step`` is the ring step (or 0);
    ``macs`` the useful multiply-adds of a compute event (0 for messages).

    Metadata for pictures, outside :meth:`key` and equality (so ledger equality is unchanged):
    ``group`` the global ranks of the group the event happened in (which of USP's concurrent
    all-to-alls it belongs to); ``seq`` its place in its rank's own order of events (set by
    :meth:`Ledger.log`; steps repeat within a phase, ``seq`` does not); ``block`` the rank whose
    block a compute event worked on (the K/V block's owner, or the chunk), None if not one block.
    """

    op: str
    rank: int
    peer: int | None
    nbytes: int
    phase: str
    step: int = 0
    macs: int = 0
    group: tuple[int, ...] | None = field(default=None, compare=False)
    seq: int = field(default=-1, compare=False)
    block: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def is_message(self) -> bool:
        """True for events that move bytes (everything but ``compute``)."""
        return self.op != "compute"

    def key(self) -> tuple:
        """What "ledger equality" compares: (op, rank, peer, nbytes, phase, step)."""
        return (self.op, self.rank, self.peer, self.nbytes, self.phase, self.step)


def wire_bytes(op: str, tensor_bytes: int, world: int) -> int:
    """Bytes one rank puts on the wire for ``op`` on a tensor of ``tensor_bytes`` bytes.

    ``tensor_bytes`` is the rank's input for send/all_to_all/all_reduce, its input chunk for
    all_gather and its output chunk for reduce_scatter; ``world`` is the group size. Integer
    division, as in the table of Design, *The ledger* (ring all-reduce = reduce-scatter +
    all-gather).
    """
    if world < 1 or tensor_bytes < 0:
        raise ValueError(f"need world >= 1 and tensor_bytes >= 0, got {world=}, {tensor_bytes=}")
    if op == "send":
        return tensor_bytes
    if op == "all_to_all":
        return tensor_bytes * (world - 1) // world
    if op in ("all_gather", "reduce_scatter"):
        return tensor_bytes * (world - 1)
    if op == "all_reduce":
        return 2 * tensor_bytes * (world - 1) // world
    raise ValueError(
        f"wire_bytes knows send, all_to_all, all_gather, reduce_scatter, all_reduce; got {op!r}"
    )


@dataclass(eq=False)
class Ledger:
    """An ordered list of :class:`CommEvent`, with totals (equal only to itself)."""

    events: list[CommEvent] = field(default_factory=list)
    _logged_by_rank: dict[int, int] = field(default_factory=dict, repr=False)

    def log(self, event: CommEvent) -> None:
        """Append one event, numbered in its rank's own order (``seq``: 0, 1, 2, ...)."""
        seq = self._logged_by_rank.get(event.rank, 0)
        self._logged_by_rank[event.rank] = seq + 1
        self.events.append(replace(event, seq=seq))

    def messages(self, rank: int | None = None) -> list[CommEvent]:
        """Message events (no compute), of one rank or of all, in logged order."""
        return [e for e in self.events if e.is_message and (rank is None or e.rank == rank)]

    def bytes_sent(self, rank: int | None = None, phase: str | None = None) -> int:
        """Total bytes put on the wire by ``rank`` (or by all ranks), optionally in one phase."""
        return sum(e.nbytes for e in self.messages(rank) if phase is None or e.phase == phase)

    def macs(self, rank: int | None = None, phase: str | None = None) -> int:
        """Useful multiply-adds logged by compute events of ``rank`` (or of all ranks)."""
        return sum(
            e.macs
            for e in self.events
            if not e.is_message
            and (rank is None or e.rank == rank)
            and (phase is None or e.phase == phase)
        )

    def summary(self) -> str:
        """A readable table: per rank and phase, messages, bytes sent and useful MACs."""
        rows: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for e in self.events:
            row = rows[(e.rank, e.phase)]
            if e.is_message:
                row[0] += 1
                row[1] += e.nbytes
            else:
                row[2] += e.macs
        lines = [f"{'rank':>4} {'phase':<8} {'messages':>8} {'bytes sent':>12} {'useful MACs':>14}"]
        for (rank, phase), (count, nbytes, macs) in sorted(rows.items()):
            lines.append(f"{rank:>4} {phase:<8} {count:>8} {nbytes:>12,} {macs:>14,}")
        return "\n".join(lines)


_open_ledgers: list[Ledger] = []


@contextlib.contextmanager
def record() -> Iterator[Ledger]:
    """Capture the events this process logs while the block runs.

    Recordings nest: an event goes to every open recording, so an outer one sees everything and
    an inner one only what happened inside it. Nothing is captured outside any recording.
    """
    led = Ledger()
    _open_ledgers.append(led)
    try:
        yield led
    finally:
        _open_ledgers.remove(led)


def log(event: CommEvent) -> None:
    """Log ``event`` into every open recording (a no-op when none is open)."""
    for led in _open_ledgers:
        led.log(event)
