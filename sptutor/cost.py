"""Closed-form costs of each method: bytes every rank sends, and bytes it keeps for backward.

Tests assert that the oracle's ledger and ``saved_bytes`` (and the real code's) equal these
numbers exactly, so each formula is a claim about the method, checked. Bytes on the wire follow
``ledger.wire_bytes`` (DESIGN §5); accumulators travel in float32 for 16-bit inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sptutor.blocks import accumulation_dtype


@dataclass(frozen=True)
class Shape:
    """The sizes a cost depends on: B, S, Hq, Hkv, D and the inputs' dtype."""

    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> Shape:
        """The shape of full inputs q: (B, S, Hq, D), k: (B, S, Hkv, D)."""
        batch, seq_len, heads_q, head_dim = q.shape
        return cls(batch, seq_len, heads_q, k.shape[2], head_dim, q.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the inputs."""
        return self.dtype.itemsize

    @property
    def acc_itemsize(self) -> int:
        """Bytes per element of LSEs and gradient accumulators."""
        return accumulation_dtype(self.dtype).itemsize

    def tokens_bytes(self, tokens: int, heads: int, itemsize: int | None = None) -> int:
        """Bytes of a (B, tokens, heads, D) tensor."""
        return self.batch * tokens * heads * self.head_dim * (itemsize or self.itemsize)


@dataclass(frozen=True)
class Cost:
    """Per rank: bytes sent in forward, bytes sent in backward, bytes kept for backward."""

    forward: tuple[int, ...]
    backward: tuple[int, ...]
    saved: tuple[int, ...]


def _same_for_every_rank(world: int, forward: int, backward: int, saved: int) -> Cost:
    return Cost((forward,) * world, (backward,) * world, (saved,) * world)


def ring(shape: Shape, world: int) -> Cost:
    """Ring attention over W ranks, per rank.

    Forward: K and V blocks make W-1 hops: ``2(W-1)·B·(S/W)·Hkv·D`` elements.
    Backward: K and V again (W-1 hops), plus the dK, dV accumulators (W hops, float32 for
    16-bit inputs): ``2(W-1)·kv + 2W·kv_acc``; nothing for W = 1.
    Saved: this rank's q, k, v, out and its LSE (B, Hq, S/W) in the accumulation dtype: O(S/W).
    """
    tokens = shape.seq_len // world
    kv = shape.tokens_bytes(tokens, shape.heads_kv)
    kv_acc = shape.tokens_bytes(tokens, shape.heads_kv, shape.acc_itemsize)
    q_or_out = shape.tokens_bytes(tokens, shape.heads_q)
    lse = shape.batch * shape.heads_q * tokens * shape.acc_itemsize
    forward = 2 * (world - 1) * kv
    backward = 2 * (world - 1) * kv + (2 * world * kv_acc if world > 1 else 0)
    return _same_for_every_rank(world, forward, backward, 2 * q_or_out + 2 * kv + lse)


def of(
    method: str, shape: Shape, world: int, *, causal: bool = False, ulysses: int | None = None
) -> Cost:
    """The cost of ``method`` (a name of DESIGN §1) on ``world`` ranks, per rank.

    ``ulysses`` is the Ulysses degree U of ``usp`` (ring degree ``world // U``); ``causal`` matters
    only for the linear methods (non-causal LASP is one all-reduce).
    """
    if method == "usp":
        return globals()["usp"](shape, ulysses=ulysses, ring=world // ulysses)
    if method in ("lasp", "lasp2"):
        return globals()[method](shape, world, causal=causal)
    if method in ("rsa", "ring", "ulysses", "lss"):
        return globals()[method](shape, world)
    raise ValueError(f"no closed-form cost for {method!r}")
