"""An emulated world of W ranks: per-rank state as Python lists, collectives as list operations.

Nothing here touches ``torch.distributed``. Index ``i`` of every list is the ``i``-th rank of the
group; ``World.ranks[i]`` is its global rank. Each collective logs one ``CommEvent`` per sending
rank into the shared ledger, by the rules of Design, *The ledger*: the sender logs, ranks are
global, bytes come from ``ledger.wire_bytes``, and a group of one rank moves nothing and logs
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sptutor.ledger import CommEvent, Ledger, wire_bytes


def nbytes(x: torch.Tensor) -> int:
    """Bytes a tensor occupies (and puts on the wire when sent whole)."""
    return x.numel() * x.element_size()


class Pending:
    """Tensors on their way round an emulated ring; :meth:`wait` returns what each rank got
    (the emulated twin of ``sptutor.comm.RingShift``: here they arrived at once)."""

    def __init__(self, received: list[list[torch.Tensor]]) -> None:
        self.received = received

    def wait(self) -> list[list[torch.Tensor]]:
        """``received[i]``: the tensors rank i received from the previous rank."""
        return self.received


@dataclass
class StepRecord:
    """What one rank computed at one step, kept when a simulation records its steps.

    ``rank``: the global rank that computed; ``block``: the global rank whose K, V block it was
    (None when not one block); ``tensors``: e.g. ``out``/``lse`` of that block alone (B, S/W,
    Hq, D) / (B, Hq, S/W) in forward, or its ``dq``, ``dk``, ``dv`` in backward.
    """

    rank: int
    phase: str
    step: int
    block: int | None
    tensors: dict[str, torch.Tensor]


@dataclass
class World:
    """A group of emulated ranks sharing one ledger (sub-groups share their parent's).

    ``steps`` is None unless the simulation records what every step computed (a list of
    :class:`StepRecord`, shared with sub-groups).
    """

    ranks: list[int]
    ledger: Ledger = field(default_factory=Ledger)
    steps: list[StepRecord] | None = None
    _mailbox: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        """The number of ranks W in this group."""
        return len(self.ranks)

    def group(self, members: list[int]) -> World:
        """A sub-group of this world's ranks (indices into ``self.ranks``), same ledger."""
        return World([self.ranks[i] for i in members], self.ledger, self.steps)

    def _log(self, op: str, index: int, peer: int | None, size: int, phase: str, step: int) -> None:
        nbytes_sent = wire_bytes(op, size, self.size)
        event = CommEvent(op, self.ranks[index], peer, nbytes_sent, phase, step,
                          group=tuple(self.ranks))  # fmt: skip
        self.ledger.log(event)

    def compute(
        self,
        index: int,
        macs: int,
        phase: str,
        step: int = 0,
        *,
        block: int | None = None,
        result: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Log that rank ``index`` did ``macs`` useful multiply-adds, on the block of rank
        ``block`` (an index into this group, logged as a global rank) if it was one block;
        ``result`` (what the step computed) is kept when the world records its steps."""
        owner = None if block is None else self.ranks[block]
        event = CommEvent("compute", self.ranks[index], None, 0, phase, step, macs,
                          group=tuple(self.ranks), block=owner)  # fmt: skip
        self.ledger.log(event)
        if self.steps is not None and result is not None:
            self.steps.append(StepRecord(self.ranks[index], phase, step, owner, result))

    def ring_shift(self, tensors: list[list[torch.Tensor]], *, phase: str, step: int) -> Pending:
        """Every rank sends its tensors to the next rank and receives the previous rank's.

        ``tensors[i]`` is the list rank i sends (as ``sptutor.comm.ring_shift`` takes one rank's);
        ``.wait()`` on the result returns ``received`` with ``received[i]`` rank i-1's tensors.
        """
        if self.size == 1:
            return Pending(tensors)
        for i, row in enumerate(tensors):
            for x in row:
                self._log("send", i, self.ranks[(i + 1) % self.size], nbytes(x), phase, step)
        return Pending(
            [[x.clone() for x in tensors[(i - 1) % self.size]] for i in range(self.size)]
        )

    def send(self, x: torch.Tensor, src: int, dst: int, *, phase: str, step: int = 0) -> None:
        """Point-to-point: rank ``src`` sends ``x`` to rank ``dst`` (it waits in ``dst``'s
        mailbox until :meth:`recv`), as ``sptutor.comm.send`` does from rank ``src``."""
        self._log("send", src, self.ranks[dst], nbytes(x), phase, step)
        self._mailbox.setdefault((src, dst), []).append(x.clone())

    def recv(self, src: int, dst: int) -> torch.Tensor:
        """What rank ``dst`` receives from rank ``src``: the oldest message in the mailbox
        (``sptutor.comm.recv`` on rank ``dst``; receives are not logged)."""
        waiting = self._mailbox.get((src, dst))
        if not waiting:
            raise RuntimeError(f"rank {dst} receives from rank {src}, which sent nothing yet")
        return waiting.pop(0)

    def all_to_all(
        self, chunks: list[list[torch.Tensor]], *, phase: str, step: int = 0
    ) -> list[list[torch.Tensor]]:
        """``chunks[i][j]`` goes from rank i to rank j; returns ``received[j][i]``.

        Each rank's input is the W equal chunks it holds (one stays home).
        """
        if self.size == 1:
            return chunks
        for i, row in enumerate(chunks):
            self._log("all_to_all", i, None, sum(nbytes(x) for x in row), phase, step)
        return [[chunks[i][j].clone() for i in range(self.size)] for j in range(self.size)]

    def all_gather(
        self, tensors: list[torch.Tensor], *, phase: str, step: int = 0
    ) -> list[torch.Tensor]:
        """Every rank receives every rank's tensor: ``gathered[j]`` is rank j's copy, a
        (W, *shape) tensor whose ``[i]`` is ``tensors[i]`` (as ``sptutor.comm.all_gather``)."""
        if self.size == 1:
            return [tensors[0][None]]
        for i, x in enumerate(tensors):
            self._log("all_gather", i, None, nbytes(x), phase, step)
        return [torch.stack(tensors) for _ in range(self.size)]  # W x (W, *shape)

    def reduce_scatter(
        self, chunks: list[list[torch.Tensor]], *, phase: str, step: int = 0
    ) -> list[torch.Tensor]:
        """``chunks[i][j]`` is rank i's contribution to rank j: returns ``sum_i chunks[i][j]``."""
        if self.size == 1:
            return [chunks[0][0]]
        for i in range(self.size):
            self._log("reduce_scatter", i, None, nbytes(chunks[i][i]), phase, step)
        return [sum(chunks[i][j] for i in range(self.size)) for j in range(self.size)]

    def all_reduce(
        self, tensors: list[torch.Tensor], *, phase: str, step: int = 0
    ) -> list[torch.Tensor]:
        """Every rank receives the sum of every rank's tensor."""
        if self.size == 1:
            return tensors
        for i, x in enumerate(tensors):
            self._log("all_reduce", i, None, nbytes(x), phase, step)
        total = sum(tensors)
        return [total.clone() for _ in range(self.size)]


@dataclass
class RankRecord:
    """What rank r holds at the end: its shards of the results and what it kept for backward.

    out: (B, S/W, Hq, D); lse: (B, Hq, S/W) (None for linear methods); dq: (B, S/W, Hq, D) and
    dk, dv: (B, S/W, Hkv, D) (None without ``dout``); saved_bytes: bytes kept between forward and
    backward; state_in: the state received from the previous rank (linear methods).
    """

    out: torch.Tensor
    lse: torch.Tensor | None = None
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    saved_bytes: int = 0
    state_in: torch.Tensor | None = None


@dataclass
class Simulation:
    """What ``oracle.simulate`` returns: full-size results, per-rank records, the ledger, and the
    call that produced them (what the pictures of ``sptutor.plots`` need besides the ledger).

    ``positions[r]``: (S/W,) the global positions rank r owns (``layout`` is "custom" when they
    were passed in); ``shape``: (B, S, Hq, Hkv, D) of the full inputs; ``ulysses``: U (1 unless
    usp); ``decay`` as passed (linear methods); ``steps``: what each step computed, in order, when
    asked for (``record_steps=True``; ring and lss record every block); ``cu_seqlens``: the
    packed documents' (N+1,) offsets, or None (one document); ``documents[r]``: (S_r,) the
    document id of each token rank r holds (None without cu_seqlens).
    """

    out: torch.Tensor
    lse: torch.Tensor | None
    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    ranks: list[RankRecord]
    ledger: Ledger
    method: str = ""
    world: int = 1
    layout: str = "contiguous"
    causal: bool = False
    ulysses: int = 1
    positions: list[torch.Tensor] = field(default_factory=list)
    shape: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    decay: torch.Tensor | None = None
    steps: list[StepRecord] = field(default_factory=list)
    cu_seqlens: torch.Tensor | None = None
    documents: list[torch.Tensor | None] = field(default_factory=list)
