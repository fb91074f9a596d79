"""Layouts (Design, *Layouts*): who owns which global positions."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import layout
from tests.strategies import world_and_seq


@given(world_and_seq(), st.integers(1, 3))
def test_unshard_inverts_shard(case, dim):
    """unshard(shard(x)) == x exactly, for every layout, on any dim, shards contiguous."""
    world, lay, seq_len = case
    shape = [2, 3, 2, 2]
    shape[dim] = seq_len
    x = torch.randn(*shape)
    shards = layout.shard(x, world=world, layout=lay, dim=dim)
    assert all(s.is_contiguous() and s.shape[dim] == seq_len // world for s in shards)
    assert torch.equal(layout.unshard(shards, layout=lay, dim=dim), x)


@given(world_and_seq())
def test_positions_form_a_permutation(case):
    """The ranks' positions together are every position exactly once."""
    world, lay, seq_len = case
    owned = torch.cat(
        [layout.positions(seq_len, world=world, rank=r, layout=lay) for r in range(world)]
    )
    assert sorted(owned.tolist()) == list(range(seq_len))


def test_the_three_layouts_on_16_tokens_over_4_ranks():
    """The design's layouts written out: contiguous, zigzag (chunk r and 2W-1-r), striped."""

    def owned(lay):
        return [layout.positions(16, world=4, rank=r, layout=lay).tolist() for r in range(4)]

    assert owned("contiguous") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert owned("zigzag") == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert owned("striped") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(layout.LAYOUTS), st.integers(1, 3))
def test_usp_composition(ulysses, ring, lay, chunk):
    """With U > 1: ring layout over R ring ranks, then a contiguous split over U ulysses ranks."""
    world = ulysses * ring
    seq_len = (2 * ring if lay == "zigzag" else ring) * ulysses * chunk
    for rank in range(world):
        ring_index, ulysses_index = divmod(rank, ulysses)
        ring_tokens = layout.positions(seq_len, world=ring, rank=ring_index, layout=lay)
        piece = len(ring_tokens) // ulysses
        expected = ring_tokens[ulysses_index * piece : (ulysses_index + 1) * piece]
        got = layout.positions(seq_len, world=world, rank=rank, layout=lay, ulysses=ulysses)
        assert torch.equal(got, expected)
    x = torch.randn(1, seq_len, 1, 1)
    shards = layout.shard(x, world=world, layout=lay, ulysses=ulysses)
    assert torch.equal(layout.unshard(shards, layout=lay, ulysses=ulysses), x)


@pytest.mark.parametrize(
    ("seq_len", "world", "lay", "ulysses", "message"),
    [
        (1000, 3, "zigzag", 1, "zigzag layout needs S % (2*W) == 0, got S=1000, W=3"),
        (10, 4, "contiguous", 1, "contiguous layout needs S % W == 0, got S=10, W=4"),
        (10, 3, "striped", 1, "striped layout needs S % W == 0, got S=10, W=3"),
        (
            10,
            4,
            "zigzag",
            2,
            "zigzag layout over R=2 ring ranks needs S % 4 == 0, got S=10, W=4, U=2",
        ),
        (6, 4, "contiguous", 2, "must split over U=2 ulysses ranks"),
        (8, 4, "contiguous", 3, "ulysses degree must divide the world, got W=4, U=3"),
        (8, 2, "snake", 1, "layout must be one of"),
    ],
)
def test_bad_sizes_raise_with_the_numbers(seq_len, world, lay, ulysses, message):
    """Sizes that do not divide raise ValueError naming the precondition and the values."""
    with pytest.raises(ValueError, match=re.escape(message)):
        layout.positions(seq_len, world=world, rank=0, layout=lay, ulysses=ulysses)


def test_rank_out_of_range_raises():
    """A rank outside [0, W) is a ValueError."""
    with pytest.raises(ValueError, match="rank=4, W=4"):
        layout.positions(8, world=4, rank=4)
