"""What the kernels share: interpreted or compiled, tiles, input checks, masks and the schedule.

Importing this module (as every kernel module does first) fixes whether the ``@triton.jit``
kernels defined after it run compiled or under the Triton interpreter: Triton reads
``TRITON_INTERPRET`` each time ``@triton.jit`` decorates a function, not when a kernel launches.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl  # noqa: F401 (the interpreter needs tl beside a jit function)

# True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1, e.g. on a CPU)
INTERPRETED = bool(triton.knobs.runtime.interpret)

# the smallest tile side ``tl.dot`` takes on a GPU; heads of D < 16 are padded up to it
MIN_DOT = 16

# sentinel positions for padded rows and columns of a tile: they never see or are seen (causal);
# also the bounds of an empty range of document ids (a tile of padding only)
POSITION_MIN, POSITION_MAX = -(2**31), 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch parameters: tile sides (queries ``block_m``, keys ``block_n``; tokens ``block_m``
    for linear attention), and ``num_warps``, ``num_stages`` for the compiler (ignored when
    interpreted)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def block_d(head_dim: int) -> int:
    """The padded head dim of a tile: the next power of 2, at least 16 (masked inside)."""
    return max(MIN_DOT, triton.next_power_of_2(head_dim))


# (block_m, block_n, num_warps, num_stages) by element size and head dim (<= 64, <= 128, <= 256):
# the largest tiles that compile for sm_90 without register spills (ptxas -v), forward and
# backward (the dK/dV and dQ kernels share one tile shape). Starting points: tune on the GPU.
_FLASH_TILES = {
    "forward": {
        2: ((128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
        4: ((64, 32, 8, 2), (32, 16, 4, 2), (32, 16, 8, 2)),
        8: ((32, 32, 8, 1), (32, 32, 8, 1), (16, 16, 8, 1)),
    },
    "backward": {
        2: ((64, 64, 8, 2), (32, 64, 8, 2), (16, 32, 8, 2)),
        4: ((32, 32, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
        8: ((16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)),
    },
}


def flash_config(head_dim: int, dtype: torch.dtype, *, backward: bool = False) -> TileConfig:
    """Tiles for ``flash_attention_*``: 16 x 16 interpreted (small tiles keep partial and skipped
    tiles in the tests' small shapes), else from ``_FLASH_TILES``. 16-bit inputs use tensor
    cores; fp32 (exact products) and fp64 run on FMA units and need smaller tiles."""
    if INTERPRETED:
        return TileConfig(16, 16, num_warps=1, num_stages=1)
    width = 0 if head_dim <= 64 else 1 if head_dim <= 128 else 2
    size = torch.finfo(dtype).bits // 8
    tiles = _FLASH_TILES["backward" if backward else "forward"][size][width]
    return TileConfig(*tiles)


# (tokens per sub-chunk, state columns per program, num_warps, num_stages) by element size and
# head dim (<= 64, <= 128, <= 256), chosen like _FLASH_TILES (fp64 still spills a little)
_LINEAR_TILES = {
    2: ((32, 64, 8, 2), (16, 64, 8, 2), (16, 16, 8, 2)),
    4: ((16, 16, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1)),
    8: ((16, 16, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1)),
}


def linear_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tiles for ``linear_attention_*``: ``block_m`` tokens per sub-chunk, ``block_n`` columns of
    the D x D state per program. Interpreted: 16 tokens and every column in one program (fewer
    programs run faster in numpy); else from ``_LINEAR_TILES``."""
    if INTERPRETED:
        return TileConfig(16, block_d(head_dim), num_warps=1, num_stages=1)
    width = 0 if head_dim <= 64 else 1 if head_dim <= 128 else 2
    tokens, columns, num_warps, num_stages = _LINEAR_TILES[torch.finfo(dtype).bits // 8][width]
    return TileConfig(tokens, min(columns, block_d(head_dim)), num_warps, num_stages)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q: (B, S_q, Hq, D), k, v: (B, S_k, Hkv, D), Hq % Hkv == 0, D <= 256, one dtype the kernels
    take (bf16 only compiled) and one device they run on (CUDA, or any when interpreted).
    Raises ValueError for shapes, TypeError for dtypes and devices (see Design, *Errors*)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, S, H, D) tensor, got {getattr(x, 'shape', x)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "need q: (B, S_q, Hq, D) and k, v: (B, S_k, Hkv, D), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"need Hq % Hkv == 0, got Hq={q.shape[2]}, Hkv={k.shape[2]}")
    if q.shape[3] > 256:
        raise ValueError(f"the kernels take head dims up to 256, got D={q.shape[3]}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v need one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = (torch.float16, torch.float32, torch.float64)
    if q.dtype not in allowed and not (q.dtype == torch.bfloat16 and not INTERPRETED):
        note = " (the Triton interpreter has no bfloat16)" if q.dtype == torch.bfloat16 else ""
        raise TypeError(
            f"the kernels take float16, bfloat16, float32 or float64, got {q.dtype}{note}"
        )
    if not q.device == k.device == v.device:
        raise TypeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not INTERPRETED and not q.is_cuda:
        raise TypeError(
            f"sptutor.kernels needs CUDA tensors when Triton runs compiled, got {q.device}; "
            "set TRITON_INTERPRET=1 before importing sptutor.kernels to run them on the CPU"
        )


def strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the batch, sequence and head dims of a (B, S, H, D) tensor (D is contiguous)."""
    return x.stride(0), x.stride(1), x.stride(2)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (as ``sptutor.blocks``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positions(pos: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Global positions as contiguous int32 on ``device`` (default ``arange(length)``); positions
    must be below 2**31 (sequences of up to two billion tokens)."""
    if pos is None:
        return torch.arange(length, dtype=torch.int32, device=device)
    if pos.shape != (length,):
        raise ValueError(f"positions must have shape ({length},), got {tuple(pos.shape)}")
    return pos.to(device=device, dtype=torch.int32).contiguous()


def documents(
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
    seq_q: int,
    seq_k: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Document ids of the queries (S_q,) and keys (S_k,) as contiguous int32 on ``device``, or
    (None, None) for one document. Ids must be below 2**31; a negative id (-1) marks padding.
    Raises ValueError unless both or neither are given and for wrong shapes, TypeError for
    non-integer ids."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError("give document ids for both queries and keys (q_doc, k_doc), or neither")
    if q_doc is None:
        return None, None
    ids = []
    for name, doc, length in (("q_doc", q_doc, seq_q), ("k_doc", k_doc, seq_k)):
        if not isinstance(doc, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor of document ids, got {type(doc)}")
        if doc.dtype.is_floating_point or doc.is_complex() or doc.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of document ids, got {doc.dtype}")
        if doc.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(doc.shape)}")
        ids.append(doc.to(device=device, dtype=torch.int32).contiguous())
    return ids[0], ids[1]


@triton.jit
def same_document(row_doc, col_doc):
    """(R, C) bool from ids (R,), (C,): one document, and not padding (a negative id). Equal ids
    share a sign, so testing the rows' is enough (and the test is symmetric)."""
    return (row_doc[:, None] == col_doc[None, :]) & (row_doc >= 0)[:, None]


def tile_schedule(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    block_m: int,
    block_n: int,
    *,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    by_key: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tiles each program visits; a (query tile, key tile) pair is skipped when fully masked.

    q_pos: (S_q,), k_pos: (S_k,) global positions. Causal, a pair is fully masked when its latest
    query comes before its earliest key: ``max(q_pos in tile) < min(k_pos in tile)``.
    q_doc: (S_q,), k_doc: (S_k,) document ids or None: a pair is also fully masked when the
    ranges ``[min, max]`` of the ids of its valid tokens (id >= 0) do not overlap, and so is
    every pair of a tile holding padding (id < 0) only. Both tests are conservative: a pair
    holding one visible (query, key) is never skipped.
    Returns counts: (T,) int32, how many tiles each program visits, and tiles: (T, T') int32,
    their indices first (in order), the skipped ones after: per query tile the key tiles
    (T = T_q), or with ``by_key`` per key tile the query tiles (T = T_k, for the dK/dV kernel).
    A few small torch ops on the positions' device, no host sync.
    """
    visible = _visible_tiles(q_pos, k_pos, causal, block_m, block_n)  # (T_q, T_k)
    if q_doc is not None:
        q_first, q_last = _document_ranges(q_doc, block_m)  # (T_q,) each
        k_first, k_last = _document_ranges(k_doc, block_n)  # (T_k,) each
        # [q_first, q_last] and [k_first, k_last] overlap; an empty range (first > last) never does
        first = torch.maximum(q_first[:, None], k_first[None, :])
        visible = visible & (first <= torch.minimum(q_last[:, None], k_last[None, :]))
    return _compact(visible.T if by_key else visible)


def _visible_tiles(q_pos, k_pos, causal, block_m, block_n) -> torch.Tensor:
    """(T_q, T_k) bool: does any query of tile i see any key of tile j (causally)?"""
    tiles_q, tiles_k = triton.cdiv(q_pos.numel(), block_m), triton.cdiv(k_pos.numel(), block_n)
    if not causal:
        return torch.ones(tiles_q, tiles_k, dtype=torch.bool, device=q_pos.device)
    q_last = _pad(q_pos, tiles_q * block_m, POSITION_MIN).view(tiles_q, block_m).amax(1)
    k_first = _pad(k_pos, tiles_k * block_n, POSITION_MAX).view(tiles_k, block_n).amin(1)
    return q_last[:, None] >= k_first[None, :]


def _document_ranges(doc: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest id of the valid tokens (id >= 0) of each tile: (T,), (T,).

    Padding ids (and the columns past the end) become a sentinel per reduction, so a tile of
    padding only gets first = POSITION_MAX > last = POSITION_MIN, an empty range."""
    tiles = triton.cdiv(doc.numel(), block)
    doc = _pad(doc, tiles * block, -1).view(tiles, block)
    padding = doc < 0
    first = doc.masked_fill(padding, POSITION_MAX).amin(1)
    last = doc.masked_fill(padding, POSITION_MIN).amax(1)
    return first, last


def _pad(pos: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """pos followed by ``value`` up to ``length`` entries."""
    fill = torch.full((length - pos.numel(),), value, dtype=pos.dtype, device=pos.device)
    return torch.cat([pos, fill])


def _compact(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise counts of True and the column indices, True ones first, as int32."""
    counts = visible.sum(1, dtype=torch.int32)
    tiles = torch.argsort((~visible).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts, tiles.contiguous()
