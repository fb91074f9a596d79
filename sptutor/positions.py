"""Where the tiny GPT's tokens sit: global S, each rank's global positions, documents, RoPE.

Every rank of ``sptutor.model`` runs on its shard of one (maybe packed) sequence. What it needs
to know about its tokens, beyond their ids, is gathered in a :class:`Placement`: their global
positions (masks, the loss mask, RoPE), the positions RoPE turns them by (global, or inside their
document with ``rope_per_document``), the global length S (a shard alone cannot tell it when W
does not divide S), the packed documents' ``cu_seqlens`` and the SP group.

Packed documents (see ``sptutor.layout``): ``cu_seqlens`` (N+1,) global offsets, 0 first, S last,
the same on every rank and for every batch row. The loss does not count the target of a
document's last token: that target is the first token of the next document (or lies past the
sequence), which nothing inside the document can predict (:func:`counted_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sptutor import backends, blocks, layout


@dataclass(frozen=True)
class Placement:
    """This rank's tokens in the global sequence, as every block of the model needs them.

    ``positions``: (S_loc,) global positions (masks, loss mask); ``rope``: (S_loc,) the positions
    RoPE turns them by; ``seq_len``: the global S; ``cu_seqlens``: (N+1,) or None (one document);
    ``group``/``mesh``: the SP group (``mesh`` for usp), None on one process.
    """

    positions: torch.Tensor
    rope: torch.Tensor
    seq_len: int
    cu_seqlens: torch.Tensor | None = None
    group: object = None
    mesh: object = None


def place(
    config, ids, *, group=None, mesh=None, positions=None, seq_len=None, cu_seqlens=None
) -> Placement:
    """Where the tokens ``ids`` (B, S_loc) of a ``GPTConfig`` ``config``'s model sit: the
    arguments of ``sptutor.model.TinyGPT.logits``, checked and completed."""
    world = sp_world(config, group=group, mesh=mesh)
    # S: cu_seqlens[-1], else seq_len, else W·S_loc (as every SP method works it out)
    total = backends.sequence_length(ids.shape[1], world, seq_len, cu_seqlens)
    if positions is None:
        positions = sp_positions(config, ids.shape[1], group=group, mesh=mesh, seq_len=total)
    positions = positions.to(ids.device)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(ids.device)
    rope = rope_positions(positions, cu_seqlens, config.rope_per_document)
    return Placement(positions, rope, total, cu_seqlens, group, mesh)


def sp_world(config, *, group=None, mesh=None) -> int:
    """W, the number of SP ranks the sequence is cut over (1 for the single-process baselines).

    ``config``: a ``sptutor.model.GPTConfig``."""
    if config.attention in ("full", "linear"):
        return 1
    return mesh.world if config.attention == "usp" else dist.get_world_size(group)


def sp_positions(
    config, seq_local: int, *, group=None, mesh=None, seq_len: int | None = None
) -> torch.Tensor:
    """This rank's global positions (S_loc,) under ``config.layout`` (see Design, *Layouts*).

    ``seq_len``: the global S (default ``W * S_loc``; needed when W does not divide S).
    """
    world = sp_world(config, group=group, mesh=mesh)
    if world == 1:
        return torch.arange(seq_local)
    total = seq_local * world if seq_len is None else seq_len
    if config.attention == "usp":
        if mesh is None or mesh.ulysses != config.ulysses:
            raise ValueError(f"usp needs a mesh with U={config.ulysses}, got {mesh}")
        rank = dist.get_rank(mesh.group)
    else:
        rank = dist.get_rank(group)
    return layout.positions(
        total, world=world, rank=rank, layout=config.layout, ulysses=config.ulysses
    )


def document_starts(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The global position where each token's document starts: (S_loc,) for ``positions``
    (S_loc,) global and ``cu_seqlens`` (N+1,)."""
    offsets = cu_seqlens.to(device=positions.device, dtype=torch.long)
    return offsets[layout.document_ids(offsets, positions)]


def rope_positions(
    positions: torch.Tensor, cu_seqlens: torch.Tensor | None, per_document: bool
) -> torch.Tensor:
    """The positions RoPE turns tokens by: (S_loc,) global ``positions`` themselves, or, with
    ``per_document`` and packed documents, the position inside the document (global position
    minus the document's start: every document starts at angle 0)."""
    if not per_document or cu_seqlens is None:
        return positions
    return positions - document_starts(positions, cu_seqlens)


def counted_targets(positions: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Which tokens' targets the loss counts: (S_loc,) bool, or None (all of them).

    With packed documents, not the last token of each document (global position ``p`` with
    ``p + 1 == cu_seqlens[n + 1]`` for its document n): its next token starts another document.
    """
    if cu_seqlens is None:
        return None
    offsets = cu_seqlens.to(device=positions.device, dtype=torch.long)
    ends = offsets[layout.document_ids(offsets, positions) + 1]  # (S_loc,) end of own document
    return positions + 1 != ends


def counted_per_sequence(seq_len: int, cu_seqlens: torch.Tensor | None) -> int:
    """How many targets of one sequence of ``seq_len`` tokens the loss counts: S, less one per
    non-empty document when packed. ValueError when none is left (every document one token)."""
    if cu_seqlens is None:
        return seq_len
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (N,)
    counted = seq_len - int((lengths > 0).sum())
    if counted < 1:
        raise ValueError(
            f"every document of cu_seqlens={cu_seqlens.tolist()} is one token long: no target "
            "is left to predict inside a document"
        )
    return counted


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE: rotate pairs of channels of x: (B, S_loc, H, D) by angles of positions (S_loc,).

    Channel i is paired with channel i + D/2 and turned by ``position · base^(-2i/D)``; only the
    positions matter, so any layout gives each token the rotation it has in the full sequence.
    Angles and the rotation are computed in float32 (float64 for float64 x), then cast back: a
    16-bit position would round (bfloat16 keeps 8 bits, so positions above 256 collide).
    """
    acc = blocks.accumulation_dtype(x.dtype)
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=acc, device=x.device) / half)  # (D/2,)
    angles = (
        positions.to(device=x.device, dtype=acc)[:, None] * frequencies[None, :]
    )  # (S_loc, D/2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, S_loc, 1, D/2)
    first, second = x[..., :half].to(acc), x[..., half:].to(acc)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)
