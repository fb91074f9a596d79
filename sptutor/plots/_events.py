"""Reading a ledger for pictures: one phase's events per rank, collectives matched across ranks,
and a column for every event (each rank's own order, a collective in one column for its group)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from sptutor.ledger import CommEvent

EventKey = tuple[int, int]  # (rank, seq): names one event of a ledger


def per_rank(events: list[CommEvent], phase: str) -> dict[int, list[CommEvent]]:
    """The events of ``phase``, rank by rank, each rank's in its own order (``seq``)."""
    ranks: dict[int, list[CommEvent]] = defaultdict(list)
    for event in events:
        if event.phase == phase:
            ranks[event.rank].append(event)
    return {rank: sorted(evs, key=lambda e: e.seq) for rank, evs in sorted(ranks.items())}


@dataclass(frozen=True)
class Collective:
    """One collective call: the events its members logged (one per rank, in group order).

    ``index`` counts the calls of the same op over the same group in this phase (0, 1, ...).
    """

    op: str
    phase: str
    group: tuple[int, ...]
    index: int
    events: tuple[CommEvent, ...]

    @property
    def gid(self) -> str:
        """``"all_to_all:forward:0,1:2"``: op, phase, group, index."""
        group = ",".join(map(str, self.group))
        return f"{self.op}:{self.phase}:{group}:{self.index}"


def _call_key(event: CommEvent, counts: dict) -> tuple:
    """(op, group, k): the k-th call of this op over this group, as ``event.rank`` sees it."""
    group = event.group or ()
    k = counts[(event.rank, event.op, group)]
    counts[(event.rank, event.op, group)] = k + 1
    return (event.op, group, k)


def collectives(events: list[CommEvent], phase: str) -> list[Collective]:
    """Every collective call of ``phase``: the k-th all_to_all a rank logs over a group is the
    k-th of every other member (collectives are called in the same order by all members)."""
    counts: dict = defaultdict(int)
    calls: dict[tuple, list[CommEvent]] = defaultdict(list)
    for rank_events in per_rank(events, phase).values():
        for event in rank_events:
            if event.is_message and event.op != "send":
                calls[_call_key(event, counts)].append(event)
    return [
        Collective(op, phase, group, k, tuple(sorted(members, key=lambda e: e.rank)))
        for (op, group, k), members in calls.items()
    ]


def columns(events: list[CommEvent], phase: str) -> dict[EventKey, int]:
    """A column for each event of ``phase``: after its rank's previous event, and one column for
    all members of a collective call (the latest any member could reach). Keys: (rank, seq)."""
    ranks = per_rank(events, phase)
    column = {(e.rank, e.seq): i for evs in ranks.values() for i, e in enumerate(evs)}
    members = [[(e.rank, e.seq) for e in call.events] for call in collectives(events, phase)]
    for _ in range(len(column) + 1):  # each pass settles at least one more event
        changed = False
        for evs in ranks.values():
            for before, after in itertools.pairwise(evs):
                earliest = column[(before.rank, before.seq)] + 1
                if column[(after.rank, after.seq)] < earliest:
                    column[(after.rank, after.seq)], changed = earliest, True
        for keys in members:
            latest = max(column[key] for key in keys)
            for key in keys:
                if column[key] != latest:
                    column[key], changed = latest, True
        if not changed:
            return column
    raise RuntimeError(f"the {phase} collectives are called in different orders by their ranks")
