"""Hypothesis strategies shared by the tests: shapes, head ratios, positions, tensors."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from sptutor import layout

HEAD_DIMS = (1, 3, 8, 16, 24, 40)  # odd sizes on purpose


@st.composite
def heads(draw) -> tuple[int, int]:
    """(Hq, Hkv) with Hq % Hkv == 0: MHA, GQA and MQA."""
    heads_kv = draw(st.integers(1, 3))
    return heads_kv * draw(st.integers(1, 3)), heads_kv


def tensors(seed: int, *shapes: tuple[int, ...], dtype=torch.float64) -> list[torch.Tensor]:
    """Standard-normal tensors of the given shapes from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype) for shape in shapes]


@st.composite
def world_and_seq(draw, max_world: int = 8, max_chunk: int = 3) -> tuple[int, str, int]:
    """(W, layout, S) with S divisible as the layout needs."""
    world = draw(st.integers(1, max_world))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    unit = 2 * world if lay == "zigzag" else world
    return world, lay, unit * draw(st.integers(1, max_chunk))


@st.composite
def positions(draw, length: int, max_pos: int = 20) -> torch.Tensor:
    """Arbitrary global positions (repeats and any order allowed): (length,)."""
    return torch.tensor(draw(st.lists(st.integers(0, max_pos), min_size=length, max_size=length)))
