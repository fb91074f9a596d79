"""Layouts (Design, *Layouts*): who owns which global positions."""

import itertools
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
    assert all(s.is_contiguous() and s.shape[dim] == seq_len // world for s in shards)  # W | S
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
        expected = ring_tokens.tensor_split(ulysses)[ulysses_index]
        got = layout.positions(seq_len, world=world, rank=rank, layout=lay, ulysses=ulysses)
        assert torch.equal(got, expected)
    x = torch.randn(1, seq_len, 1, 1)
    shards = layout.shard(x, world=world, layout=lay, ulysses=ulysses)
    assert torch.equal(layout.unshard(shards, layout=lay, ulysses=ulysses), x)


@st.composite
def any_split(draw, max_world: int = 8) -> tuple[int, str, int, int]:
    """(W, layout, S, U) with any S the layout can cut (S >= W; zigzag S >= 2W), U | W."""
    ulysses = draw(st.integers(1, 3))
    world = ulysses * draw(st.integers(1, max_world // ulysses))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    fewest = 2 * world if lay == "zigzag" else world
    return world, lay, draw(st.integers(fewest, fewest + 3 * world)), ulysses


@given(any_split(), st.integers(1, 3))
def test_any_sequence_length_shards_differ_by_at_most_one_token(case, dim):
    """Any S >= W: shards differ by at most one token, each rank's positions increase, and
    unshard(shard(x)) == x exactly (USP composition included)."""
    world, lay, seq_len, ulysses = case
    shape = [2, 3, 2, 2]
    shape[dim] = seq_len
    x = torch.randn(*shape)
    owned = layout.all_positions(seq_len, world=world, layout=lay, ulysses=ulysses)
    lengths = [len(p) for p in owned]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    assert all(bool((p[1:] > p[:-1]).all()) for p in owned)
    assert sorted(torch.cat(owned).tolist()) == list(range(seq_len))
    shards = layout.shard(x, world=world, layout=lay, ulysses=ulysses, dim=dim)
    assert [s.shape[dim] for s in shards] == lengths
    assert torch.equal(layout.unshard(shards, layout=lay, ulysses=ulysses, dim=dim), x)


def test_uneven_layouts_written_out():
    """Who gets the extra tokens: contiguous the first S % W ranks, striped rank r the tokens
    r, r+W, ..., zigzag 2W chunks whose first S % 2W are one token longer."""

    def owned(seq_len, world, lay, ulysses=1):
        cut = layout.all_positions(seq_len, world=world, layout=lay, ulysses=ulysses)
        return [p.tolist() for p in cut]

    assert owned(10, 4, "contiguous") == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert owned(10, 4, "striped") == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert owned(7, 2, "zigzag") == [[0, 1, 6], [2, 3, 4, 5]]
    assert owned(11, 4, "contiguous", ulysses=2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]


@pytest.mark.parametrize(
    ("seq_len", "world", "lay", "ulysses", "message"),
    [
        (5, 3, "zigzag", 1, "zigzag layout needs S >= 2*W (2W chunks of at least one token), "
                            "got S=5, W=3"),
        (3, 4, "contiguous", 1, "contiguous layout needs S >= W (every rank owns a token), "
                                "got S=3, W=4"),
        (2, 3, "striped", 1, "striped layout needs S >= W"),
        (7, 4, "zigzag", 2, "zigzag layout needs S >= 2*W"),
        (8, 4, "contiguous", 3, "ulysses degree must divide the world, got W=4, U=3"),
        (8, 2, "snake", 1, "layout must be one of"),
    ],
)  # fmt: skip
def test_impossible_sizes_raise_with_the_numbers(seq_len, world, lay, ulysses, message):
    """Only sizes no layout can cut raise: ValueError naming the precondition and the values."""
    with pytest.raises(ValueError, match=re.escape(message)):
        layout.positions(seq_len, world=world, rank=0, layout=lay, ulysses=ulysses)


def test_unshard_names_shards_that_no_layout_cut():
    """Shards of the wrong lengths for their S are a ValueError with both lists."""
    with pytest.raises(ValueError, match=re.escape("gives shards of [3, 3, 2, 2] tokens")):
        layout.unshard([torch.zeros(1, n) for n in (2, 3, 3, 2)], layout="contiguous")


@st.composite
def packings(draw, max_seq_len: int = 24) -> torch.Tensor:
    """cu_seqlens (N+1,) over S tokens: boundaries anywhere, empty documents allowed."""
    seq_len = draw(st.integers(1, max_seq_len))
    cuts = draw(st.lists(st.integers(0, seq_len), max_size=6))
    return torch.tensor([0, *sorted(cuts), seq_len])


@given(packings(), st.integers(1, 4), st.sampled_from(layout.LAYOUTS))
def test_local_documents_match_the_global_ones(cu_seqlens, world, lay):
    """Each rank's document ids are those of its global positions, and its local cu_seqlens
    cut its shard exactly where the stored tokens change document."""
    seq_len = int(cu_seqlens[-1])
    if seq_len < (2 * world if lay == "zigzag" else world):
        return
    bounds = cu_seqlens.tolist()
    for rank in range(world):
        pos = layout.positions(seq_len, world=world, rank=rank, layout=lay)
        docs, local = layout.local_documents(cu_seqlens, world=world, rank=rank, layout=lay)
        expected = [max(n for n in range(len(bounds) - 1) if bounds[n] <= p) for p in pos.tolist()]
        assert docs.tolist() == expected
        assert local[0] == 0 and local[-1] == len(pos)
        runs = [docs[a:b].unique().tolist() for a, b in itertools.pairwise(local)]
        assert all(len(run) == 1 for run in runs)
        assert all(x != y for x, y in itertools.pairwise(runs))


@pytest.mark.parametrize(
    ("cu_seqlens", "error", "message"),
    [
        (torch.tensor([0.0, 4.0]), TypeError, "integer torch.Tensor"),
        ([0, 4], TypeError, "integer torch.Tensor"),
        (torch.tensor([4]), ValueError, "N+1 >= 2 offsets"),
        (torch.tensor([1, 4]), ValueError, "start at 0 and end at S=4, got 1 ... 4"),
        (torch.tensor([0, 3]), ValueError, "start at 0 and end at S=4, got 0 ... 3"),
        (torch.tensor([0, 3, 2, 4]), ValueError, "cu_seqlens[1]=3 > cu_seqlens[2]=2"),
    ],
)
def test_bad_cu_seqlens_raise_with_the_numbers(cu_seqlens, error, message):
    """cu_seqlens must be integer offsets from 0 to S that never decrease."""
    with pytest.raises(error, match=re.escape(message)):
        layout.check_cu_seqlens(cu_seqlens, 4)


def test_rank_out_of_range_raises():
    """A rank outside [0, W) is a ValueError."""
    with pytest.raises(ValueError, match="rank=4, W=4"):
        layout.positions(8, world=4, rank=4)
