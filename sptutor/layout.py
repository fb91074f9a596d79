"""Which global token positions each rank owns, shared by oracle and real code.

See Design, *Layouts*.

Three ways to cut a sequence of ``S`` tokens over ``W`` ranks:

- ``contiguous``: rank r owns the r-th of W consecutive pieces, ``[r*S/W, (r+1)*S/W)`` when W
  divides S; otherwise the first ``S % W`` ranks own one token more.
- ``zigzag``: cut S into ``2W`` chunks (sizes differ by at most one); rank r owns chunk r, then
  chunk ``2W-1-r``, so that under a causal mask every rank has the same amount of work.
- ``striped``: rank r owns tokens ``r, r+W, r+2W, ...`` (naturally uneven when W does not
  divide S).

Any ``S >= W`` works (zigzag: ``S >= 2W``); shards differ by at most one token, and each rank
stores its tokens in increasing order of position.

USP composes them: with ``ulysses=U`` the world is ``R = W/U`` ring ranks of ``U`` ulysses ranks
each (``rank = ring_index * U + ulysses_index``); the layout is applied over the ``R`` ring ranks,
then each ring rank's tokens are split contiguously over its ``U`` ulysses ranks.

Packed documents: ``cu_seqlens`` (LongTensor ``(N+1,)``, cumulative document lengths over the
global sequence, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == S``) says where each document
starts. :func:`document_ids` gives each token its document, :func:`local_documents` gives a rank
its local document ids and local ``cu_seqlens`` (for libraries that take local ones).
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")


def sizes(length: int, parts: int) -> list[int]:
    """``length`` cut into ``parts`` pieces that differ by at most one: the first
    ``length % parts`` get one more (as ``torch.tensor_split`` cuts)."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


def check_layout_name(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_layout(seq_len: int, *, world: int, layout: str, ulysses: int = 1) -> None:
    """Raise ``ValueError`` (with the numbers) unless ``seq_len`` splits over ``world`` ranks.

    ``world`` is the SP world size ``W``; ``ulysses`` the Ulysses degree ``U`` of a USP mesh.
    Any ``S >= W`` splits (zigzag: any ``S >= 2W``), every rank owning at least one token.
    """
    check_layout_name(layout)
    if world < 1 or ulysses < 1:
        raise ValueError(f"world and ulysses must be >= 1, got W={world}, U={ulysses}")
    if world % ulysses:
        raise ValueError(f"ulysses degree must divide the world, got W={world}, U={ulysses}")
    if layout == "zigzag" and seq_len < 2 * world:
        raise ValueError(
            f"zigzag layout needs S >= 2*W (2W chunks of at least one token), "
            f"got S={seq_len}, W={world}"
        )
    if seq_len < world:
        raise ValueError(
            f"{layout} layout needs S >= W (every rank owns a token), got S={seq_len}, W={world}"
        )


def _ring_positions(seq_len: int, ring: int, ring_index: int, layout: str) -> torch.Tensor:
    """Global positions ring rank ``ring_index`` of ``ring`` owns, in increasing order."""
    if layout == "striped":
        return torch.arange(ring_index, seq_len, ring)
    if layout == "contiguous":
        bounds = [0, *torch.tensor(sizes(seq_len, ring)).cumsum(0).tolist()]
        return torch.arange(bounds[ring_index], bounds[ring_index + 1])
    bounds = [0, *torch.tensor(sizes(seq_len, 2 * ring)).cumsum(0).tolist()]
    mirror = 2 * ring - 1 - ring_index  # zigzag: chunk r, then its mirror 2R-1-r
    first = torch.arange(bounds[ring_index], bounds[ring_index + 1])
    return torch.cat([first, torch.arange(bounds[mirror], bounds[mirror + 1])])


def positions(
    seq_len: int, *, world: int, rank: int, layout: str = "contiguous", ulysses: int = 1
) -> torch.Tensor:
    """Global token positions that ``rank`` owns, in the order it stores them (increasing).

    Returns a LongTensor of shape ``(S_r,)``: ``S/W`` tokens when W divides S, otherwise one
    more or one fewer (contiguous gives the first ``S % W`` ranks the extra token; striped
    gives rank r the tokens ``r, r+W, ...``; zigzag cuts 2W chunks that differ by at most one).
    With ``ulysses=U > 1`` this is the USP composition: ring index ``rank // U`` takes its
    tokens under ``layout`` over ``R = W/U`` ring ranks, and ulysses index ``rank % U`` takes
    the ``(rank % U)``-th contiguous piece of them (pieces that differ by at most one).
    """
    check_layout(seq_len, world=world, layout=layout, ulysses=ulysses)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, W), got rank={rank}, W={world}")
    ring_index, ulysses_index = divmod(rank, ulysses)
    ring_tokens = _ring_positions(seq_len, world // ulysses, ring_index, layout)  # (S/R,)
    return ring_tokens.tensor_split(ulysses)[ulysses_index]  # (S_r,)


def all_positions(
    seq_len: int, *, world: int, layout: str = "contiguous", ulysses: int = 1, device=None
) -> list[torch.Tensor]:
    """Every rank's global positions, ``W x (S_r,)``: what each rank needs to build masks for the
    blocks it receives (and to size the blocks it receives). Checks the layout's sizes first
    (ValueError with the numbers)."""
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
    Returns a list of ``W`` tensors, shard r of shape ``(B, S_r, H, D)`` holding the tokens
    ``positions(S, world=W, rank=r, ...)`` in that order (``S_r`` differs by at most one).
    """
    owned = all_positions(x.shape[dim], world=world, layout=layout, ulysses=ulysses)
    return shard_by(x, owned, dim=dim)


def unshard(
    shards: list[torch.Tensor], *, layout: str = "contiguous", ulysses: int = 1, dim: int = 1
) -> torch.Tensor:
    """Put the ranks' shards back in global order: the inverse of :func:`shard`.

    ``shards``: ``W`` tensors of shape ``(B, S_r, H, D)`` (sequence on ``dim``), as
    :func:`shard` cut them. Returns the full tensor ``(B, S, H, D)``;
    ``unshard(shard(x)) == x`` exactly.
    """
    held = [s.shape[dim] for s in shards]
    seq_len = sum(held)
    owned = all_positions(seq_len, world=len(shards), layout=layout, ulysses=ulysses)
    expected = [len(p) for p in owned]
    if held != expected:
        raise ValueError(
            f"the {layout} layout of S={seq_len} over W={len(shards)} ranks gives shards of "
            f"{expected} tokens along dim {dim}, got {held}"
        )
    return unshard_by(shards, owned, dim=dim)


def check_partition(owned: list[torch.Tensor], seq_len: int) -> None:
    """Raise ``ValueError`` unless ``owned`` (W integer tensors, one per rank, each of at least
    one position) holds every position of ``0..S-1`` exactly once: a layout of one's own."""
    if not owned or any(not isinstance(p, torch.Tensor) or p.dim() != 1 for p in owned):
        raise ValueError("positions must be a non-empty list of 1-D tensors, one per rank")
    if any(p.dtype.is_floating_point or p.dtype == torch.bool for p in owned):
        raise ValueError(f"positions must be integer tensors, got {[p.dtype for p in owned]}")
    lengths = [len(p) for p in owned]
    if min(lengths) < 1 or sum(lengths) != seq_len:
        raise ValueError(
            f"every rank must own at least one position, S={seq_len} in all, "
            f"got {lengths} for W={len(owned)}"
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
    """Shards of ``x`` for explicit positions: shard r holds the tokens ``owned[r]`` (S_r,), in
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


def check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int | None) -> None:
    """Raise unless ``cu_seqlens`` is an integer (N+1,) tensor, N >= 1, that starts at 0, never
    decreases and ends at ``seq_len`` = S (any end when None); TypeError for a wrong type,
    ValueError otherwise."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point:
        kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor (N+1,), got {kind}")
    if cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor of N+1 >= 2 offsets, got shape "
            f"{tuple(cu_seqlens.shape)} of {cu_seqlens.dtype}"
        )
    offsets = cu_seqlens.detach().cpu().tolist()
    if offsets[0] != 0 or (seq_len is not None and offsets[-1] != seq_len):
        end = "" if seq_len is None else f" and end at S={seq_len}"
        raise ValueError(f"cu_seqlens must start at 0{end}, got {offsets[0]} ... {offsets[-1]}")
    falls = [i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]]
    if falls:
        i = falls[0]
        raise ValueError(
            f"cu_seqlens must not decrease, got cu_seqlens[{i - 1}]={offsets[i - 1]} > "
            f"cu_seqlens[{i}]={offsets[i]}"
        )


def document_ids(cu_seqlens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The document of each token: ``cu_seqlens`` (N+1,) global offsets, ``pos`` (L,) global
    positions -> (L,) LongTensor, document n holding positions ``cu_seqlens[n] ..
    cu_seqlens[n+1]-1`` (on ``pos``'s device)."""
    offsets = cu_seqlens.to(device=pos.device, dtype=torch.long)
    return torch.searchsorted(offsets, pos.to(torch.long), right=True) - 1


def local_documents(
    cu_seqlens: torch.Tensor,
    *,
    world: int,
    rank: int,
    layout: str = "contiguous",
    ulysses: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What rank ``rank`` holds of packed documents, for libraries that take local ones.

    ``cu_seqlens``: (N+1,) global offsets over S = ``cu_seqlens[-1]`` tokens. Returns the
    rank's document ids (S_r,), one per token it holds (in its storage order), and its local
    ``cu_seqlens`` (M+1,) (see :func:`documents_of`).
    """
    seq_len = int(cu_seqlens[-1])
    check_cu_seqlens(cu_seqlens, seq_len)
    owned = positions(seq_len, world=world, rank=rank, layout=layout, ulysses=ulysses)
    return documents_of(cu_seqlens, owned)


def documents_of(
    cu_seqlens: torch.Tensor, owned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The document ids (S_r,) of the tokens at global positions ``owned`` (S_r,), in that order,
    and their local ``cu_seqlens`` (M+1,): the offsets, in that order, where a run of tokens of
    one document starts (the document changes from one stored token to the next), then S_r.
    Local offsets say which tokens share a document, not where they sit: masks still need the
    positions."""
    docs = document_ids(cu_seqlens, owned)
    return docs, runs(docs)


def runs(docs: torch.Tensor) -> torch.Tensor:
    """Where each run of one document starts in ``docs`` (L,) (document ids in storage order),
    then L: (M+1,) offsets, one run where the id changes from one token to the next."""
    starts = torch.ones(len(docs), dtype=torch.bool, device=docs.device)
    starts[1:] = docs[1:] != docs[:-1]
    ends = torch.tensor([len(docs)], device=docs.device)
    return torch.cat([starts.nonzero().flatten(), ends])
