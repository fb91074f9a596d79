"""What every closed form is written in: the shape of a call, a per-rank cost, each rank's shard."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sptutor.blocks import accumulation_dtype
from sptutor.layout import all_positions


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


def same_for_every_rank(world: int, forward: int, backward: int, saved: int) -> Cost:
    return Cost((forward,) * world, (backward,) * world, (saved,) * world)


def shard_sizes(
    seq_len: int, world: int, layout: str = "contiguous", ulysses: int = 1
) -> list[int]:
    """S_r, the tokens each of the W ranks holds under ``layout`` (``sptutor.layout``)."""
    return [len(p) for p in all_positions(seq_len, world=world, layout=layout, ulysses=ulysses)]
