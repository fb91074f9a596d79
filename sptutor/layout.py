"""Which global token positions each rank owns, shared by oracle and real code.

See Design, *Layouts*.

Three ways to cut a sequence of ``S`` tokens over ``W`` ranks:

- ``contiguous``: rank r owns ``[r*S/W, (r+1)*S/W)``. Needs ``S % W == 0``.
- ``zigzag``: cut S into ``2W`` chunks; rank r owns chunk r, then chunk ``2W-1-r``, so that under a
  causal mask every rank has the same amount of work. Needs ``S % (2*W) == 0``.
- ``striped``: rank r owns tokens ``r, r+W, r+2W, ...``. Needs ``S % W == 0``.

USP composes them: with ``ulysses=U`` the world is ``R = W/U`` ring ranks of ``U`` ulysses ranks
each (``rank = ring_index * U + ulysses_index``); the layout is applied over the ``R`` ring ranks,
then each ring rank's tokens are split contiguously over its ``U`` ulysses ranks.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(seq_len: int, *, world: int, layout: str, ulysses: int = 1) -> None:
    """Raise ``ValueError`` (with the numbers) unless ``seq_len`` splits over ``world`` ranks.

    ``world`` is the SP world size ``W``; ``ulysses`` the Ulysses degree ``U`` of a USP mesh.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world < 1 or ulysses < 1:
        raise ValueError(f"world and ulysses must be >= 1, got W={world}, U={ulysses}")
    if world % ulysses:
        raise ValueError(f"ulysses degree must divide the world, got W={world}, U={ulysses}")
    ring = world // ulysses
    chunks = 2 * ring if layout == "zigzag" else ring
    if seq_len % chunks and ulysses == 1:
        need = "S % (2*W) == 0" if layout == "zigzag" else "S % W == 0"
        raise ValueError(f"{layout} layout needs {need}, got S={seq_len}, W={world}")
    if seq_len % chunks:
        raise ValueError(
            f"{layout} layout over R={ring} ring ranks needs S % {chunks} == 0, "
            f"got S={seq_len}, W={world}, U={ulysses}"
        )
    if (seq_len // ring) % ulysses:
        raise ValueError(
            f"each ring rank's {seq_len // ring} tokens must split over U={ulysses} ulysses ranks, "
            f"got S={seq_len}, W={world}, U={ulysses}"
        )


def _ring_positions(seq_len: int, ring: int, ring_index: int, layout: str) -> torch.Tensor:
    """Global positions ring rank ``ring_index`` of ``ring`` owns, in order: (S/R,)."""
    if layout == "contiguous":
        size = seq_len // ring
        return torch.arange(ring_index * size, (ring_index + 1) * size)
    if layout == "striped":
        return torch.arange(ring_index, seq_len, ring)
    chunk = seq_len // (2 * ring)  # zigzag: chunk r, then its mirror 2R-1-r
    first = torch.arange(ring_index * chunk, (ring_index + 1) * chunk)
    mirror = 2 * ring - 1 - ring_index
    return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk)])


def positions(
    seq_len: int, *, world: int, rank: int, layout: str = "contiguous", ulysses: int = 1
) -> torch.Tensor:
    """Global token positions that ``rank`` owns, in the order it stores them.

    Returns a LongTensor of shape ``(S/W,)``. With ``ulysses=U > 1`` this is the USP composition:
    ring index ``rank // U`` takes its tokens under ``layout`` over ``R = W/U`` ring ranks, and
    ulysses index ``rank % U`` takes the ``(rank % U)``-th contiguous piece of them.
    """
    check_layout(seq_len, world=world, layout=layout, ulysses=ulysses)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, W), got rank={rank}, W={world}")
    ring_index, ulysses_index = divmod(rank, ulysses)
    ring_tokens = _ring_positions(seq_len, world // ulysses, ring_index, layout)  # (S/R,)
    return ring_tokens.chunk(ulysses)[ulysses_index]  # (S/W,)


def all_positions(
    seq_len: int, *, world: int, layout: str = "contiguous", ulysses: int = 1, device=None
) -> list[torch.Tensor]:
    """Every rank's global positions, ``W x (S/W,)``: what each rank needs to build masks for the
    blocks it receives. Checks the layout's sizes first (ValueError with the numbers)."""
    check_layout(seq_len, world=world, layout=layout, ulysses=ulysses)
    return [
        positions(seq_len, world=world, rank=r, layout=layout, ulysses=ulysses).to(device)
        for r in range(world)
    ]


def shard(
    x: torch.Tensor, *, world: int, layout: str = "contiguous", ulysses: int = 1, dim: int = 1
) -> list[torch.Tensor]:
    """Cut a full tensor into the ``world`` shards the ranks hold (each contiguous).

    ``x``: full tensor, e.g. ``(B, S, H, D)`` with the sequence on ``dim``.
    Returns a list of ``W`` tensors, shard r of shape ``(B, S/W, H, D)`` holding the tokens
    ``positions(S, world=W, rank=r, ...)`` in that order.
    """
    owned = all_positions(x.shape[dim], world=world, layout=layout, ulysses=ulysses)
    return shard_by(x, owned, dim=dim)


def unshard(
    shards: list[torch.Tensor], *, layout: str = "contiguous", ulysses: int = 1, dim: int = 1
) -> torch.Tensor:
    """Put the ranks' shards back in global order: the inverse of :func:`shard`.

    ``shards``: ``W`` tensors of shape ``(B, S/W, H, D)`` (sequence on ``dim``).
    Returns the full tensor ``(B, S, H, D)``; ``unshard(shard(x)) == x`` exactly.
    """
    sizes = {s.shape[dim] for s in shards}
    if len(sizes) != 1:
        raise ValueError(
            f"all shards must hold S/W tokens along dim {dim}, got sizes {sorted(sizes)}"
        )
    seq_len = sum(s.shape[dim] for s in shards)
    owned = all_positions(seq_len, world=len(shards), layout=layout, ulysses=ulysses)
    return unshard_by(shards, owned, dim=dim)


def check_partition(owned: list[torch.Tensor], seq_len: int) -> None:
    """Raise ``ValueError`` unless ``owned`` (W integer tensors of S/W positions each, one per
    rank) holds every position of ``0..S-1`` exactly once: a layout of one's own."""
    if not owned or any(not isinstance(p, torch.Tensor) or p.dim() != 1 for p in owned):
        raise ValueError("positions must be a non-empty list of 1-D tensors, one per rank")
    if any(p.dtype.is_floating_point or p.dtype == torch.bool for p in owned):
        raise ValueError(f"positions must be integer tensors, got {[p.dtype for p in owned]}")
    lengths = [len(p) for p in owned]
    if len(set(lengths)) != 1 or sum(lengths) != seq_len:
        raise ValueError(
            f"every rank must own S/W positions of S={seq_len}, got {lengths} for W={len(owned)}"
        )
    every = torch.cat(owned).cpu()
    if bool((every < 0).any()):
        raise ValueError(f"positions must be >= 0, got {every.min().item()}")
    counts = torch.bincount(every, minlength=seq_len)
    if len(counts) != seq_len or not bool((counts == 1).all()):
        missing = (counts[:seq_len] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"positions must hold each of 0..{seq_len - 1} exactly once; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, or one is repeated or out of range"
        )


def shard_by(x: torch.Tensor, owned: list[torch.Tensor], *, dim: int = 1) -> list[torch.Tensor]:
    """Shards of ``x`` for explicit positions: shard r holds the tokens ``owned[r]`` (S/W,), in
    that order, along ``dim`` (``x``: e.g. (B, S, H, D))."""
    return [x.index_select(dim, pos.to(x.device)).contiguous() for pos in owned]


def unshard_by(
    shards: list[torch.Tensor], owned: list[torch.Tensor], *, dim: int = 1
) -> torch.Tensor:
    """The inverse of :func:`shard_by`: shard r's tokens go back to positions ``owned[r]``."""
    full_shape = list(shards[0].shape)
    full_shape[dim] = sum(s.shape[dim] for s in shards)
    full = shards[0].new_empty(full_shape)
    for pos, part in zip(owned, shards):
        full.index_copy_(dim, pos.to(part.device), part)
    return full
