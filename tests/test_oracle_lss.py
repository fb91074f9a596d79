"""The LSS oracle (our reading): exact, one all-gather and one reduce-scatter, O(S) memory."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import cost, oracle
from tests.helpers import (
    assert_16_bit_no_worse_than_plain_attention,
    assert_ledger_matches_cost,
    assert_simulation_is_exact,
    softmax_case,
)
from tests.strategies import tensors


@given(softmax_case())
def test_lss_oracle_equals_full_attention(case):
    """LSS (any W 1..8, layout, causal, GQA/MQA, odd D, scale) == full attention and its grads."""
    assert_simulation_is_exact("lss", case)


@given(softmax_case(), st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_lss_ledger_and_saved_bytes_equal_the_closed_form(case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost.lss exactly."""
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    sim = oracle.simulate("lss", q, k, v, dout, world=case["world"], causal=case["causal"],
                          layout=case["layout"])  # fmt: skip
    assert_ledger_matches_cost(sim, cost.lss(cost.Shape.of(q, k), case["world"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_lss_schedule_message_by_message(dtype):
    """W=3: each rank sends one all-gather of [K‖V] forward, one reduce-scatter of [dK‖dV] back."""
    shapes = (1, 6, 2, 4), (1, 6, 1, 4), (1, 6, 1, 4), (1, 6, 2, 4)
    q, k, v, dout = tensors(0, *shapes, dtype=dtype)
    sim = oracle.simulate("lss", q, k, v, dout, world=3)
    kv_pair = 2 * 1 * 2 * 1 * 4  # [K‖V] shard: 2·B·(S/W)·Hkv·D elements
    gradient_itemsize = 8 if dtype == torch.float64 else 4  # [dK‖dV] travel in float32 for fp16
    for rank in range(3):
        assert [(e.op, e.peer, e.nbytes, e.phase, e.step) for e in sim.ledger.messages(rank)] == [
            ("all_gather", None, 2 * kv_pair * dtype.itemsize, "forward", 0),
            ("reduce_scatter", None, 2 * kv_pair * gradient_itemsize, "backward", 0),
        ]


def test_world_of_one_sends_nothing():
    """W=1 is plain attention: no message at all (size-1 groups log nothing)."""
    q, k, v, dout = tensors(1, (1, 4, 2, 4), (1, 4, 1, 4), (1, 4, 1, 4), (1, 4, 2, 4))
    assert oracle.simulate("lss", q, k, v, dout, world=1).ledger.messages() == []


def _saved_bytes(seq_len, world):
    """What rank 0 keeps for backward (B=1, Hq=2, Hkv=1, D=4, float64)."""
    q, k, v = tensors(2, (1, seq_len, 2, 4), (1, seq_len, 1, 4), (1, seq_len, 1, 4))
    return oracle.simulate("lss", q, k, v, world=world).ranks[0].saved_bytes


def test_lss_saved_bytes_grow_as_s_whatever_w():
    """Gathered K, V dominate: doubling S doubles what a rank keeps; more ranks barely shrink it."""
    seq_len, world = 64, 4
    local = 1 * (seq_len // world) * 2 * (4 + 4 + 1) * 8  # q, out (B, S/W, Hq, D), lse (B, Hq, S/W)
    gathered_kv = 2 * 1 * seq_len * 1 * 4 * 8  # K and V (B, S, Hkv, D) float64
    assert _saved_bytes(seq_len, world) == local + gathered_kv
    assert _saved_bytes(2 * seq_len, world) == 2 * (local + gathered_kv)
    assert _saved_bytes(seq_len, 2 * world) == local // 2 + gathered_kv


def test_lss_skips_fully_masked_blocks():
    """Contiguous causal W=4: rank 0 computes only on its own block, rank 3 on all four."""
    q, k, v = tensors(4, (1, 8, 1, 2), (1, 8, 1, 2), (1, 8, 1, 2))
    sim = oracle.simulate("lss", q, k, v, world=4, causal=True)
    computed = [sum(e.op == "compute" and e.rank == r for e in sim.ledger.events) for r in range(4)]
    assert computed == [1, 2, 3, 4]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lss_16_bit_is_no_worse_than_plain_attention(dtype, causal):
    """16-bit inputs are as accurate as plain 16-bit attention (float32 blocks and merges)."""
    assert_16_bit_no_worse_than_plain_attention("lss", dtype, causal)


def test_uneven_shards_are_gathered_padded():
    """W=3, S=7 (shards 3, 2, 2): [K‖V] and [dK‖dV] travel padded to L=3 tokens, the same bytes
    on every rank, and the gathered buffer kept for backward holds W·L = 9 tokens."""
    q, k, v, dout = tensors(0, (1, 7, 2, 4), (1, 7, 1, 4), (1, 7, 1, 4), (1, 7, 2, 4))
    sim = oracle.simulate("lss", q, k, v, dout, world=3)
    kv_pair = 2 * 1 * 3 * 1 * 4 * 8  # padded [K‖V] shard: 2·B·L·Hkv·D float64
    for rank, tokens in enumerate((3, 2, 2)):
        assert [(e.op, e.nbytes) for e in sim.ledger.messages(rank)] == [
            ("all_gather", 2 * kv_pair), ("reduce_scatter", 2 * kv_pair)]  # fmt: skip
        local = tokens * 2 * (4 + 4 + 1) * 8  # q, out (B, S_r, Hq, D), lse (B, Hq, S_r)
        assert sim.ranks[rank].saved_bytes == local + 3 * kv_pair
