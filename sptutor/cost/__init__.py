"""Closed-form costs of each method: bytes every rank sends, and bytes it keeps for backward.

Tests assert that the oracle's ledger and ``saved_bytes`` (and the real code's) equal these
numbers exactly, so each formula is a claim about the method, checked. Bytes on the wire follow
``ledger.wire_bytes`` (see Design, *The ledger*); accumulators travel in float32 for 16-bit inputs.

Any S >= W: when W does not divide S the shards S_r differ by a token (which ranks hold more
depends on the layout: the ``layout`` keywords), a ring moves each block at its own size, and
the collectives that need equal chunks move shards padded to the largest, ``L = ceil(S/W)``
(``sptutor.padding``). Packed documents change no byte: messages follow a fixed schedule.
"""

from __future__ import annotations

from sptutor.cost.linear import lasp, lasp2
from sptutor.cost.shapes import Cost, Shape, shard_sizes
from sptutor.cost.softmax import lss, ring, rsa, ulysses, usp

__all__ = ["Cost", "Shape", "lasp", "lasp2", "lss", "of", "ring", "rsa", "shard_sizes", "ulysses",
           "usp"]  # fmt: skip
SOFTMAX = {"ring": ring, "rsa": rsa, "lss": lss, "ulysses": ulysses}
LINEAR = {"lasp": lasp, "lasp2": lasp2}


def of(
    method: str,
    shape: Shape,
    world: int,
    *,
    causal: bool = False,
    ulysses: int | None = None,
    layout: str = "contiguous",
    cu_seqlens=None,
) -> Cost:
    """The cost of ``method`` (see Design, *Methods*) on ``world`` ranks, per rank.

    ``ulysses`` is the Ulysses degree U of ``usp`` (ring degree ``world // U``); ``causal`` matters
    only for the linear methods (non-causal LASP is one all-reduce); ``layout`` only when W does
    not divide S (which ranks hold the extra tokens; linear methods are contiguous);
    ``cu_seqlens`` (packed documents' offsets) only for what linear methods keep for backward
    (no state where a chunk starts a document): documents change no byte on the wire.
    """
    if method == "usp":
        return usp(shape, ulysses=ulysses, ring=world // ulysses, layout=layout)
    if method in LINEAR:
        return LINEAR[method](shape, world, causal=causal, cu_seqlens=cu_seqlens)
    if method in SOFTMAX:
        return SOFTMAX[method](shape, world, layout=layout)
    raise ValueError(f"no closed-form cost for {method!r}")
