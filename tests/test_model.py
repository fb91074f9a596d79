"""The tiny GPT on one process: global positions, loss shares, baselines vs the ground truth,
any S (uneven shards) and packed documents (each one its own sequence, RoPE per document)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sptutor import layout
from sptutor.model import (
    GPTConfig,
    TinyGPT,
    linear_decay,
    local_loss,
    rotary,
)
from sptutor.positions import counted_per_sequence, counted_targets, rope_positions
from sptutor.testing import assert_close, relative_error
from tests.strategies import tensors

CONFIG = GPTConfig(vocab=11, d_model=16, heads_q=4, heads_kv=2, layers=2, seq_len=16,
                   dtype="float64")  # fmt: skip


@st.composite
def sharding(draw) -> tuple[int, str, int, int]:
    """(W, layout, U, S): a world of 1..4 ranks, any layout, a Ulysses degree dividing W, and any
    S the layout can cut (W need not divide it: shards then differ by one token)."""
    world = draw(st.integers(1, 4))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    degree = draw(st.sampled_from([u for u in range(1, world + 1) if world % u == 0]))
    fewest = 2 * world if lay == "zigzag" else world
    return world, lay, degree, draw(st.integers(max(fewest, 2), 3 * fewest + 4))


@st.composite
def documents(draw, seq_len: int) -> torch.Tensor | None:
    """None (one document) or cu_seqlens (N+1,) of documents packed anywhere in S, empty ones
    too, with at least one target left inside a document."""
    cuts = draw(st.one_of(st.none(), st.lists(st.integers(0, seq_len), max_size=5)))
    if cuts is None:
        return None
    offsets = torch.tensor([0, *sorted(cuts), seq_len])
    return offsets if bool((offsets.diff() > 1).any()) else torch.tensor([0, seq_len])


def _kept(seq_len: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(S,) bool: the targets a packed loss counts, by hand: all but each non-empty document's
    last token."""
    kept = torch.ones(seq_len, dtype=torch.bool)
    if cu_seqlens is not None:
        kept[cu_seqlens[1:][cu_seqlens.diff() > 0] - 1] = False
    return kept


def _shard_order(seq_len: int, world: int, lay: str, degree: int) -> list[torch.Tensor]:
    """Each rank's global positions: W x (S_r,)."""
    return [
        layout.positions(seq_len, world=world, rank=r, layout=lay, ulysses=degree)
        for r in range(world)
    ]


@settings(max_examples=30)
@given(sharding(), st.data(), st.booleans(), st.integers(0, 10**6))
def test_sharded_forward_reassembles_to_the_full_forward(case, data, per_document, seed):
    """The ranks' shards, run with their global positions and put back in order, == the full run.

    All shards go through one process side by side (full attention, masks and RoPE from the given
    positions), for any S (uneven shards) and packed documents, RoPE global or per document; local
    indices instead of global positions must break it, or the test proves nothing.
    """
    world, lay, degree, seq_len = case
    cu_seqlens = data.draw(documents(seq_len))
    config = dataclasses.replace(CONFIG, seq_len=seq_len, rope_per_document=per_document)
    model = TinyGPT(config, seed=seed % 7)
    ids = torch.randint(
        0, CONFIG.vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    full = model.logits(ids, cu_seqlens=cu_seqlens)  # (B, S, vocab)
    order = _shard_order(seq_len, world, lay, degree)
    together = torch.cat(order)  # (S,) every rank's tokens, rank after rank
    sizes = [len(p) for p in order]
    shards = model.logits(ids[:, together], positions=together, cu_seqlens=cu_seqlens)
    # float64, the same math on permuted rows: the design's float64 tolerance, 1e-10 relative
    assert_close(layout.unshard(list(shards.split(sizes, dim=1)), layout=lay, ulysses=degree), full)
    local = torch.cat([torch.arange(size) for size in sizes])
    if world > 1 and cu_seqlens is None:
        wrong = model.logits(ids[:, together], positions=local)
        assert relative_error(wrong, full[:, together]) > 1e-3  # positions matter, visibly


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 1000), st.integers(0, 10**6))
def test_rope_scores_depend_only_on_relative_position(query_pos, key_pos, shift, seed):
    """q·k after RoPE at (i, j) == at (i + c, j + c): only distances reach attention."""
    q, k = tensors(seed, (1, 1, 2, 8), (1, 1, 2, 8))

    def score(i, j):
        return (rotary(q, torch.tensor([i])) * rotary(k, torch.tensor([j]))).sum(-1)

    # float64 rotations by angles up to ~1000 rad: rounding ~1e-13 relative, well under 1e-10
    assert_close(score(query_pos + shift, key_pos + shift), score(query_pos, key_pos))


@given(sharding(), st.data(), st.integers(0, 10**6))
def test_shard_losses_sum_to_the_full_mean(case, data, seed):
    """Each shard's loss over the global count of counted targets (B·S, or B·(S − N) for N packed
    documents); the shards' losses add up to the mean over the counted targets."""
    world, lay, degree, seq_len = case
    cu_seqlens = data.draw(documents(seq_len))
    (logits,) = tensors(seed, (2, seq_len, CONFIG.vocab))
    targets = torch.randint(
        0, CONFIG.vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    tokens = 2 * counted_per_sequence(seq_len, cu_seqlens)
    shares = [
        local_loss(logits[:, pos], targets[:, pos], tokens, counted_targets(pos, cu_seqlens))
        for pos in _shard_order(seq_len, world, lay, degree)
    ]
    kept = _kept(seq_len, cu_seqlens)
    expected = F.cross_entropy(logits[:, kept].flatten(0, 1), targets[:, kept].flatten())
    # float64 sums of W partial sums vs one sum: rounding only
    assert_close(torch.stack(shares).sum(), expected)


@settings(max_examples=30)
@given(st.integers(2, 24), st.data(), st.sampled_from(["full", "linear"]), st.booleans(),
       st.integers(0, 10**6))  # fmt: skip
def test_a_packed_document_is_its_own_sequence(seq_len, data, attention, per_document, seed):
    """Packed with cu_seqlens, each document's logits == that document run alone (positions from
    0), softmax (RoPE global or per document) and linear (state restarted); and the packed loss is
    the mean over every target but each document's last (the next document's first token)."""
    cu_seqlens = data.draw(documents(seq_len).filter(lambda cu: cu is not None))
    per_document = per_document and attention == "full"
    config = dataclasses.replace(CONFIG, attention=attention, rope_per_document=per_document)
    model = TinyGPT(config, seed=seed % 7)
    ids, targets = torch.randint(
        0, CONFIG.vocab, (2, 2, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    packed = model.logits(ids, cu_seqlens=cu_seqlens)  # (B, S, vocab)
    bounds = [(a, b) for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()) if b > a]
    alone = torch.cat([model.logits(ids[:, a:b]) for a, b in bounds], dim=1)
    # float64; with global RoPE the angles differ by each document's start, which cancels in q·k
    # (RoPE is relative) up to rounding ~1e-15: the design's 1e-10 relative holds either way
    assert_close(packed, alone)
    kept = _kept(seq_len, cu_seqlens)  # alone holds the documents in order: the global positions
    expected = F.cross_entropy(alone[:, kept].flatten(0, 1), targets[:, kept].flatten())
    assert_close(model(ids, targets, cu_seqlens=cu_seqlens), expected)  # float64 rounding only


def test_rope_per_document_turns_each_token_by_its_place_in_its_document():
    """Positions RoPE uses, packed documents [0, 4), [4, 4) (empty), [4, 10): global, or from 0 in
    each document; the loss skips the targets of positions 3 and 9, 8 of 10 are counted."""
    cu_seqlens = torch.tensor([0, 4, 4, 10])
    striped = torch.tensor([1, 3, 5, 7, 9])  # one rank's tokens, W=2 striped
    assert torch.equal(rope_positions(striped, cu_seqlens, per_document=False), striped)
    assert rope_positions(striped, cu_seqlens, per_document=True).tolist() == [1, 3, 1, 3, 5]
    assert rope_positions(striped, None, per_document=True).tolist() == striped.tolist()
    assert counted_targets(striped, cu_seqlens).tolist() == [True, False, True, True, False]
    assert counted_per_sequence(10, cu_seqlens) == 8 and counted_targets(striped, None) is None
    with pytest.raises(ValueError, match="no target is left"):
        counted_per_sequence(3, torch.tensor([0, 1, 2, 3]))


def test_packed_calls_that_cannot_work_raise_with_the_numbers():
    """cu_seqlens that does not end at seq_len, or not at 0 first: ValueError naming both."""
    model = TinyGPT(CONFIG)
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_len=5 but cu_seqlens ends at S=6"):
        model.logits(ids, seq_len=5, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="must start at 0"):
        model.logits(ids, cu_seqlens=torch.tensor([1, 6]))


def test_the_linear_decay_lies_in_the_open_unit_interval():
    """ALiBi-style slopes give Hq decays in (0, 1), slowest fading on the last head."""
    decay = linear_decay(8, torch.zeros((), dtype=torch.float64))
    assert decay.shape == (8,) and bool(((decay > 0) & (decay < 1)).all())
    assert bool((decay[1:] > decay[:-1]).all())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(attention="lasp", layout="zigzag"), "lasp needs layout='contiguous'"),
        (dict(attention="ring", ulysses=2), "only usp has a Ulysses degree"),
        (dict(d_model=12, heads_q=4, heads_kv=2), "heads of even size"),
        (dict(heads_kv=3), "need Hq % Hkv == 0"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(attention="lasp", rope_per_document=True), "lasp has no RoPE"),
    ],
)
def test_bad_configs_raise_with_the_numbers(changes, message):
    """A config that cannot work raises ValueError naming the precondition."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **changes)


def test_rope_in_bfloat16_rotates_by_the_exact_position():
    """RoPE of bf16 activations at positions past 256 turns each token by its own position: the
    result equals the float64 rotation of the same inputs, rounded once to bf16."""
    x = torch.randn(1, 64, 2, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    positions = torch.arange(1000, 1064)  # bf16 spaces representable integers 4 apart here
    rotated = rotary(x, positions)
    expected = rotary(x.double(), positions).bfloat16()
    assert rotated.dtype == torch.bfloat16
    # the float32 and float64 rotations differ far below bf16's spacing: at most one rounding
    # step (2^-8 relative) apart; bf16 angles would miss by whole radians
    assert relative_error(rotated.double(), expected.double()) <= 2**-8


def test_the_decay_is_made_in_the_accumulation_dtype_on_the_queries_device():
    """For 16-bit queries the decay comes in float32 (not rounded to 16 bits before it is raised
    to powers up to S) and on the queries' device."""
    exact = linear_decay(4, torch.zeros(1, dtype=torch.float64))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        decay = linear_decay(4, torch.zeros(1, dtype=dtype))
        assert decay.dtype == torch.float32 and torch.equal(decay, exact.float())
    assert linear_decay(4, torch.zeros(1, device="meta")).device.type == "meta"
