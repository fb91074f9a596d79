"""Where linear attention's state flows between the ranks' chunks, and where documents cut it.

LASP and LASP-2 hold chunk t of the sequence on rank t (contiguous layout; chunk lengths C_t may
differ by one token when W does not divide S). Without documents the state runs through every
chunk. With packed documents (``cu_seqlens``) it starts afresh at each document, so each chunk
splits into *segments*, its runs of one document, each computed as a chunk of its own:

* only the first segment reads the incoming state, and only if it **continues** the document of
  the previous chunk's last token (``reads``; never on rank 0);
* the outgoing state is the last segment's; the incoming state flows on into it only when the
  chunk is one segment that continues (``passes``);
* gradients flow back the same way: dKV into the previous chunk comes from the first segment only
  when it reads, and the dKV_out this chunk receives reaches its last segment's keys and values.

The messages do not change: every rank still sends its outgoing state (a receiver that starts a
new document ignores it), so the ledger is the same whatever the documents.

Both sides (``oracle/lasp*.py``, ``sptutor/lasp*.py``) build one :class:`Chain` from every rank's
positions and document ids and read it the same way.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from sptutor.layout import all_positions, runs


@dataclasses.dataclass(frozen=True)
class Chain:
    """How the state runs through W contiguous chunks (index t: rank t's chunk).

    ``lengths``: C_t; ``segments``: each chunk's runs of one document, slices into the chunk, in
    order (one slice of the whole chunk without documents); ``reads``: the first segment
    continues the previous chunk's document, so it reads the incoming state; ``passes``: the
    chunk is that one segment, so the incoming state flows on into the outgoing one.
    """

    lengths: tuple[int, ...]
    segments: tuple[tuple[slice, ...], ...]
    reads: tuple[bool, ...]
    passes: tuple[bool, ...]

    @classmethod
    def of(cls, positions: list[torch.Tensor], documents: list[torch.Tensor | None]) -> Chain:
        """The chain of W chunks: positions W x (C_t,) contiguous; documents W x (C_t,) document
        ids, or W x None (one document)."""
        lengths = tuple(len(p) for p in positions)
        segments = tuple(_runs(d, n) for d, n in zip(documents, lengths))
        reads = tuple(
            t > 0 and (documents[t] is None or int(documents[t][0]) == int(documents[t - 1][-1]))
            for t in range(len(positions))
        )
        passes = tuple(r and len(s) == 1 for r, s in zip(reads, segments))
        return cls(lengths, segments, reads, passes)

    def first(self, rank: int) -> slice:
        """The tokens of ``rank``'s chunk that may read the incoming state: its first segment
        (they do if ``reads[rank]``)."""
        return self.segments[rank][0]

    def last(self, rank: int) -> slice:
        """The tokens of ``rank``'s chunk that build its outgoing state: its last segment."""
        return self.segments[rank][-1]

    def before(self, rank: int) -> slice:
        """The ranks whose local states make up the state ``rank`` reads (LASP-2's prefix): back
        from rank-1 while a chunk passes its incoming state on, so the sum stops at the most
        recent document start. Empty if ``rank`` reads nothing."""
        if not self.reads[rank]:
            return slice(rank, rank)
        start = rank - 1
        while self.passes[start]:  # passes implies reads: rank start-1 >= 0 exists
            start -= 1
        return slice(start, rank)

    def after(self, rank: int) -> slice:
        """The ranks whose local dKVs make up the gradient of ``rank``'s outgoing state (LASP-2's
        suffix): forward from rank+1 while it reads, on while each chunk passes. Empty if the
        next chunk starts a document (or there is none)."""
        if rank + 1 >= len(self.lengths) or not self.reads[rank + 1]:
            return slice(rank + 1, rank + 1)
        end = rank + 1
        while end + 1 < len(self.lengths) and self.passes[end] and self.reads[end + 1]:
            end += 1
        return slice(rank + 1, end + 1)


def _runs(documents: torch.Tensor | None, length: int) -> tuple[slice, ...]:
    """The runs of one document in a chunk of ``length`` tokens with ids ``documents`` (C,)."""
    if documents is None:
        return (slice(0, length),)
    return tuple(slice(a, b) for a, b in itertools.pairwise(runs(documents.cpu()).tolist()))


def check_order(positions: list[torch.Tensor]) -> None:
    """Rank t must own the t-th chunk of the contiguous layout: the state runs in sequence order.
    positions: W x (C_t,). ValueError naming the rank otherwise."""
    expected = all_positions(sum(len(p) for p in positions), world=len(positions))
    for rank, (pos, want) in enumerate(zip(positions, expected)):
        if not torch.equal(pos.cpu(), want):
            raise ValueError(
                "lasp and lasp2 need the contiguous layout: the state runs through the sequence "
                f"in order, so rank r must own the r-th chunk, got rank {rank} with {pos.tolist()}"
            )


def check_documents(method: str, causal: bool, has_documents: bool) -> None:
    """Packed documents are causal only for linear attention (ValueError).

    Non-causal, a token reads the sum of ``k_j^T v_j`` over its whole document, before and after
    it. LASP's one all-reduce (LASP-2's one all-gather) of one D×D sum per rank mixes every
    document; a document spanning ranks would need its own total, that is messages that depend
    on where the documents lie (or a chain each way), which this schedule does not send.
    """
    if has_documents and not causal:
        raise ValueError(
            f"{method}: packed documents (cu_seqlens) need causal=True: non-causal linear "
            "attention sums K^T V over all ranks in one D×D state, which cannot keep documents "
            "apart; pass causal=True, or cu_seqlens=None for one document"
        )
