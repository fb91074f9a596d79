"""Hypothesis strategies shared by the tests: shapes, head ratios, positions, tensors."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from sptutor import layout
from sptutor.testing import random_inputs

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


def attention_inputs(
    seed: int, batch: int, seq_len: int, heads_q: int, heads_kv: int, head_dim: int
) -> list[torch.Tensor]:
    """Seeded float64 q, k, v, dout: q, dout (B, S, Hq, D) and k, v (B, S, Hkv, D)."""
    return list(random_inputs(batch, seq_len, heads_q, heads_kv, head_dim, seed=seed))


@st.composite
def world_and_seq(
    draw, max_world: int = 8, max_chunk: int = 3, min_seq_len: int = 1
) -> tuple[int, str, int]:
    """(W, layout, S) with S divisible as the layout needs, S >= min_seq_len."""
    world = draw(st.integers(1, max_world))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    unit = 2 * world if lay == "zigzag" else world
    fewest = -(-min_seq_len // unit)  # the fewest units that reach min_seq_len
    return world, lay, unit * draw(st.integers(fewest, fewest + max_chunk - 1))


@st.composite
def positions(draw, length: int, max_pos: int = 20) -> torch.Tensor:
    """Arbitrary global positions (repeats and any order allowed): (length,)."""
    return torch.tensor(draw(st.lists(st.integers(0, max_pos), min_size=length, max_size=length)))


@st.composite
def decays(draw, heads_q: int):
    """None (= 1) or a (Hq,) float64 decay in (0.5, 1]."""
    rates = st.floats(0.5, 1.0, exclude_min=True)
    values = draw(st.one_of(st.none(), st.lists(rates, min_size=heads_q, max_size=heads_q)))
    return None if values is None else torch.tensor(values, dtype=torch.float64)


def scales(head_dim: int):
    """None (the default D ** -0.5) or a softmax scale giving scores of std ~0.2..3.

    Scores have std ~ scale·sqrt(D); a saturated softmax makes dq, dk tiny by cancellation in
    P ⊙ (dP - delta), and their *relative* error meaningless, so keep scales realistic.
    """
    return st.one_of(st.none(), st.floats(0.2, 3.0).map(lambda f: f * head_dim**-0.5))
