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


def shard_edges(seq_len: int, world: int, lay: str, ulysses: int = 1) -> list[int]:
    """The positions p in 1..S-1 where the owner changes (p-1 and p on different ranks): a
    document boundary there falls on a rank's edge."""
    owner = torch.empty(seq_len, dtype=torch.long)
    for rank, pos in enumerate(layout.all_positions(seq_len, world=world, layout=lay,
                                                    ulysses=ulysses)):  # fmt: skip
        owner[pos] = rank
    return [p for p in range(1, seq_len) if owner[p] != owner[p - 1]]


@st.composite
def documents(draw, seq_len: int, edges: list[int] = ()) -> torch.Tensor | None:
    """None (no documents) or packed documents' cu_seqlens (N+1,) over S tokens: boundaries
    anywhere, some on ``edges`` (the ranks' edges), so one-token documents, empty ones (a
    repeated offset) and one document over every rank ([0, S]) all come up."""
    if draw(st.booleans()):
        return None
    cuts = draw(st.lists(st.integers(0, seq_len), max_size=6))
    if edges:
        cuts += draw(st.lists(st.sampled_from(list(edges)), max_size=3))
    return torch.tensor(sorted([0, *cuts, seq_len]))


def _uneven_seq_len(draw, world: int, lay: str, max_chunk: int = 3) -> int:
    """Any S the layout can cut (S >= W, zigzag S >= 2W), up to ``max_chunk`` units, mostly
    not a multiple of the unit W (2W for zigzag)."""
    unit = 2 * world if lay == "zigzag" else world
    return draw(st.integers(unit, max_chunk * unit + unit - 1))


@st.composite
def uneven_softmax_case(draw, max_world: int = 8, head_dims=(1, 3, 8, 24)):
    """Full float64 inputs and options for a softmax simulation with any S (shards that differ
    by a token) and packed documents or none: q, k, v, dout, world, layout, causal, scale,
    cu_seqlens."""
    world, lay = draw(st.integers(1, max_world)), draw(st.sampled_from(layout.LAYOUTS))
    seq_len = _uneven_seq_len(draw, world, lay)
    heads_q, heads_kv = draw(heads())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(head_dims))
    q, k, v, dout = attention_inputs(draw(st.integers(0, 10**6)), batch, seq_len, heads_q,
                                     heads_kv, head_dim)  # fmt: skip
    cu_seqlens = draw(documents(seq_len, shard_edges(seq_len, world, lay)))
    return dict(q=q, k=k, v=v, dout=dout, world=world, layout=lay, causal=draw(st.booleans()),
                scale=draw(scales(head_dim)), cu_seqlens=cu_seqlens)  # fmt: skip


@st.composite
def uneven_mesh_case(draw, max_world: int = 8, pure_ulysses: bool = False, head_dims=(1, 3, 8)):
    """As :func:`uneven_softmax_case`, on a U x R mesh (W = U·R; U = W if ``pure_ulysses``),
    heads that fit the Ulysses rule for U; adds ``ulysses``."""
    world = draw(st.integers(1, max_world))
    degree = world if pure_ulysses else draw(st.sampled_from([u for u in range(1, world + 1)
                                                              if world % u == 0]))  # fmt: skip
    lay = draw(st.sampled_from(layout.LAYOUTS))
    seq_len = _uneven_seq_len(draw, world, lay)
    kv_choices = [h for h in range(1, 2 * degree + 1) if h % degree == 0 or degree % h == 0]
    heads_kv = draw(st.sampled_from(kv_choices))
    heads_q = max(degree, heads_kv) * draw(st.integers(1, 2))  # one divides the other
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(head_dims))
    q, k, v, dout = attention_inputs(draw(st.integers(0, 10**6)), batch, seq_len, heads_q,
                                     heads_kv, head_dim)  # fmt: skip
    edges = shard_edges(seq_len, world, lay, degree)
    return dict(q=q, k=k, v=v, dout=dout, world=world, layout=lay, causal=draw(st.booleans()),
                scale=draw(scales(head_dim)), cu_seqlens=draw(documents(seq_len, edges)),
                ulysses=degree)  # fmt: skip
