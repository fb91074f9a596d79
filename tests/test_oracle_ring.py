"""The ring-attention oracle: exact, with the design's message schedule and memory."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import cost, oracle
from tests.helpers import (
    SIXTEEN_BIT_SIZES,
    assert_16_bit_case_no_worse,
    assert_ledger_matches_cost,
    assert_simulation_is_exact,
    softmax_case,
)
from tests.strategies import tensors


@given(softmax_case())
def test_ring_oracle_equals_full_attention(case):
    """Ring attention (any W 1..8, layout, causal, GQA/MQA, odd D, scale) == full attention."""
    assert_simulation_is_exact("ring", case)


@given(softmax_case(), st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_ring_ledger_and_saved_bytes_equal_the_closed_form(case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost.ring exactly."""
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    sim = oracle.simulate("ring", q, k, v, dout, world=case["world"], causal=case["causal"],
                          layout=case["layout"])  # fmt: skip
    assert_ledger_matches_cost(sim, cost.ring(cost.Shape.of(q, k), case["world"]))


@given(softmax_case(**SIXTEEN_BIT_SIZES), st.sampled_from([torch.float16, torch.bfloat16]))
def test_16_bit_ring_is_no_worse_than_plain_attention(case, dtype):
    """fp16/bf16 ring: out, lse, dq, dk, dv no worse than plain attention in the same dtype."""
    # the 16-bit rule (sptutor.testing), at sizes where it is stable (tests.helpers)
    assert_16_bit_case_no_worse("ring", case, dtype)


def test_ring_schedule_message_by_message():
    """W=3: forward K,V hop twice; backward K,V twice and dK,dV three times, to the next rank."""
    q, k, v, dout = tensors(0, (1, 6, 2, 4), (1, 6, 1, 4), (1, 6, 1, 4), (1, 6, 2, 4))
    sim = oracle.simulate("ring", q, k, v, dout, world=3)
    rank1 = [(e.op, e.peer, e.phase, e.step) for e in sim.ledger.messages(rank=1)]
    forward = [("send", 2, "forward", s) for s in (0, 0, 1, 1)]
    backward = [("send", 2, "backward", s) for s in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2)]
    assert rank1 == forward + backward
    kv_block = 1 * 2 * 1 * 4 * 8  # B·(S/W)·Hkv·D float64
    assert {e.nbytes for e in sim.ledger.messages()} == {kv_block}


def test_world_of_one_sends_nothing():
    """W=1 is plain attention: no message at all (size-1 groups log nothing)."""
    q, k, v, dout = tensors(1, (1, 4, 2, 4), (1, 4, 2, 4), (1, 4, 2, 4), (1, 4, 2, 4))
    assert oracle.simulate("ring", q, k, v, dout, world=1).ledger.messages() == []


def _forward_work(lay, world=4, seq_len=64):
    q, k, v = tensors(2, (1, seq_len, 2, 8), (1, seq_len, 2, 8), (1, seq_len, 2, 8))
    sim = oracle.simulate("ring", q, k, v, world=world, causal=True, layout=lay)
    return [sim.ledger.macs(rank=r, phase="forward") for r in range(world)]


def test_zigzag_balances_causal_work_exactly():
    """Zigzag + causal: every rank does exactly the same useful work (forward and backward)."""
    assert len(set(_forward_work("zigzag"))) == 1
    q, k, v, dout = tensors(3, (1, 32, 2, 8), (1, 32, 2, 8), (1, 32, 2, 8), (1, 32, 2, 8))
    sim = oracle.simulate("ring", q, k, v, dout, world=4, causal=True, layout="zigzag")
    assert len({sim.ledger.macs(rank=r, phase="backward") for r in range(4)}) == 1


def test_contiguous_causal_loads_the_last_rank_most():
    """Contiguous + causal: work grows with the rank; W=4, S=64 gives a 7:1 ratio (USP Fig. 3)."""
    work = _forward_work("contiguous")
    assert work == sorted(work) and work[-1] > work[0]
    # rank r sees r full blocks and one triangle of 16·17/2 pairs: (136 + 256 r) pairs
    assert work[-1] / work[0] == pytest.approx((136 + 3 * 256) / 136)


def test_fully_masked_blocks_are_skipped_but_still_travel():
    """Contiguous causal W=4: rank 0 computes only its own block, yet forwards every block."""
    q, k, v = tensors(4, (1, 8, 1, 2), (1, 8, 1, 2), (1, 8, 1, 2))
    sim = oracle.simulate("ring", q, k, v, world=4, causal=True)
    computed = [e.step for e in sim.ledger.events if e.op == "compute" and e.rank == 0]
    assert computed == [0]
    assert len(sim.ledger.messages(rank=0)) == 2 * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(world=7, layout="zigzag"),
            "zigzag layout needs S >= 2*W (2W chunks of at least one token), got S=12, W=7",
        ),
        (dict(world=2, ulysses=2), "ulysses= is required for usp and only for usp"),
        (dict(world=2, decay=torch.ones(2)), "decay is for linear attention"),
        (
            dict(world=13),
            "contiguous layout needs S >= W (every rank owns a token), got S=12, W=13",
        ),
    ],
)
def test_bad_options_raise(kwargs, message):
    """Sizes no layout can cut and options that do not fit are ValueErrors naming the values."""
    q, k, v = tensors(5, (1, 12, 2, 4), (1, 12, 2, 4), (1, 12, 2, 4))
    with pytest.raises(ValueError, match=re.escape(message)):
        oracle.simulate("ring", q, k, v, **kwargs)


def test_bad_tensors_raise():
    """Mismatched shapes and dtypes are caught before anything runs."""
    q, k, v = tensors(6, (1, 8, 3, 4), (1, 8, 2, 4), (1, 8, 2, 4))
    with pytest.raises(ValueError, match="Hq=3, Hkv=2"):
        oracle.simulate("ring", q, k, v, world=2)
    with pytest.raises(TypeError, match="one floating dtype"):
        oracle.simulate("ring", q[:, :, :2], k.float(), v, world=2)
    with pytest.raises(ValueError, match="method must be one of"):
        oracle.simulate("tree", q[:, :, :2], k, v, world=2)
