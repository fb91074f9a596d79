"""Uneven shards on collectives that need equal chunks: pad before, drop the padding after.

When W does not divide S, shards differ by one token (``sptutor.layout``). A ring sends each
block at its own size (``comm.ring_shift(..., receive_tokens=)``), but an all-to-all, an
all-gather and a reduce-scatter move one chunk size for every rank. So Ulysses, USP's ulysses
groups and LSS pad every shard of the collective's group to the largest, ``L = max S_r``, with
zeros, just before the collective, and drop the padding just after it: padding exists only on
the wire (the ledger counts it: it is what travels) and in buffers kept as the collective
filled them (LSS's gathered [K‖V]); no padding token reaches a mask or a softmax, so documents
and masks are those of the real tokens. With equal shards every function here is the identity
(no copy, nothing padded): the schedule and the bytes are those of the even case.

Shared by ``oracle/`` and ``sptutor/``, so both sides pad identically and their ledgers match
event for event. ``sizes`` is always the list of the group's shard lengths, in group-rank order.
"""

from __future__ import annotations

from itertools import accumulate

import torch


def spans(sizes: list[int]) -> list[slice]:
    """Where each rank's tokens lie in the concatenation of every rank's, in rank order:
    ``sizes`` (S_0, ..., S_{W-1}) -> W slices, the r-th ``[S_0+...+S_{r-1}, ... + S_r)``."""
    ends = list(accumulate(sizes))
    return [slice(end - size, end) for size, end in zip(sizes, ends)]


def pad(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """``x`` (..., S_r, ...) with zeros appended along ``dim`` up to ``length`` tokens; ``x``
    itself when it already holds ``length`` (no copy)."""
    missing = length - x.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot pad {x.shape[dim]} tokens down to {length} along dim {dim}")
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def unpad(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """The first ``length`` tokens of ``x`` (..., L, ...) along ``dim``: a view, no copy."""
    return x.narrow(dim, 0, length)


def join(pieces: list[torch.Tensor], sizes: list[int], dim: int = 1) -> torch.Tensor:
    """Received padded pieces, W x (..., L, ...), the i-th holding ``sizes[i]`` real tokens
    first, -> (..., S_0 + ... + S_{W-1}, ...): each piece's padding dropped, the rest
    concatenated along ``dim`` in rank order."""
    return torch.cat([unpad(x, size, dim) for x, size in zip(pieces, sizes)], dim=dim)


def split(x: torch.Tensor, sizes: list[int], dim: int = 1) -> list[torch.Tensor]:
    """The inverse of :func:`join`: ``x`` (..., S_0 + ... + S_{W-1}, ...) -> W pieces
    (..., L, ...), the i-th holding rank i's ``sizes[i]`` tokens then zeros, L = max(sizes)."""
    return [pad(piece, max(sizes), dim) for piece in x.split(sizes, dim=dim)]
