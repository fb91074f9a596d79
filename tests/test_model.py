"""The tiny GPT on one process: global positions, loss shares, baselines vs the ground truth."""

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
from sptutor.testing import assert_close, relative_error
from tests.strategies import tensors

CONFIG = GPTConfig(vocab=11, d_model=16, heads_q=4, heads_kv=2, layers=2, seq_len=16,
                   dtype="float64")  # fmt: skip


@st.composite
def sharding(draw) -> tuple[int, str, int, int]:
    """(W, layout, U, S): a world of 1..4 ranks, any layout, a Ulysses degree dividing W."""
    world = draw(st.integers(1, 4))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    degree = draw(st.sampled_from([u for u in range(1, world + 1) if world % u == 0]))
    unit = (2 * world if lay == "zigzag" else world) * degree
    return world, lay, degree, unit * draw(st.integers(1, 2))


def _shard_order(seq_len: int, world: int, lay: str, degree: int) -> list[torch.Tensor]:
    """Each rank's global positions: W x (S/W,)."""
    return [
        layout.positions(seq_len, world=world, rank=r, layout=lay, ulysses=degree)
        for r in range(world)
    ]


@settings(max_examples=20)
@given(sharding(), st.integers(0, 10**6))
def test_sharded_forward_reassembles_to_the_full_forward(case, seed):
    """The ranks' shards, run with their global positions and put back in order, == the full run.

    All shards go through one process side by side (full attention, masks and RoPE from the given
    positions); local indices instead of global positions must break it, or the test proves nothing.
    """
    world, lay, degree, seq_len = case
    model = TinyGPT(dataclasses.replace(CONFIG, seq_len=seq_len), seed=seed % 7)
    ids = torch.randint(
        0, CONFIG.vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    full = model.logits(ids)  # (B, S, vocab)
    order = _shard_order(seq_len, world, lay, degree)
    together = torch.cat(order)  # (S,) every rank's tokens, rank after rank
    shards = model.logits(ids[:, together], positions=together).split(seq_len // world, dim=1)
    # float64, the same math on permuted rows: the design's float64 tolerance, 1e-10 relative
    assert_close(layout.unshard(list(shards), layout=lay, ulysses=degree), full)
    local = torch.cat([torch.arange(seq_len // world)] * world)
    if world > 1:
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


@given(sharding(), st.integers(0, 10**6))
def test_shard_losses_sum_to_the_full_mean(case, seed):
    """Each shard's loss over the global count B·S; the shards' losses add up to the full mean."""
    world, lay, degree, seq_len = case
    (logits,) = tensors(seed, (2, seq_len, CONFIG.vocab))
    targets = torch.randint(
        0, CONFIG.vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    shares = [
        local_loss(logits[:, pos], targets[:, pos], tokens=targets.numel())
        for pos in _shard_order(seq_len, world, lay, degree)
    ]
    # float64 sums of W partial sums vs one sum: rounding only
    assert_close(
        torch.stack(shares).sum(), F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    )


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
