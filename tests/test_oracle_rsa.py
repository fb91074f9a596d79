"""The RSA oracle: exact, with the paper's message schedule and bytes, and O(S²/W) memory."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import cost, oracle
from sptutor.ledger import wire_bytes
from tests.helpers import (
    assert_16_bit_no_worse_than_plain_attention,
    assert_ledger_matches_cost,
    assert_simulation_is_exact,
    softmax_case,
)
from tests.strategies import tensors


@given(softmax_case())
def test_rsa_oracle_equals_full_attention(case):
    """RSA (any W 1..8, layout, causal, GQA/MQA, odd D, scale) == full attention and its grads."""
    assert_simulation_is_exact("rsa", case)


@given(softmax_case(), st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_rsa_ledger_and_saved_bytes_equal_the_closed_form(case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost.rsa exactly."""
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    sim = oracle.simulate("rsa", q, k, v, dout, world=case["world"], causal=case["causal"],
                          layout=case["layout"])  # fmt: skip
    assert_ledger_matches_cost(sim, cost.rsa(cost.Shape.of(q, k), case["world"]))


@pytest.mark.parametrize("world", range(1, 9))
def test_rsa_bytes_are_the_papers_formula(world):
    """Float64 MHA: 2(N−1)·B·Z·(L/N)·A forward and 6(N−1)·B·Z·(L/N)·A backward (paper §3.2)."""
    batch, seq_len, heads, head_dim = 2, 2 * world, 3, 5
    q, k, v, dout = tensors(world, *[(batch, seq_len, heads, head_dim)] * 4)
    sim = oracle.simulate("rsa", q, k, v, dout, world=world)
    unit = (world - 1) * batch * heads * (seq_len // world) * head_dim * 8  # float64 elements
    for rank in range(world):
        assert sim.ledger.bytes_sent(rank, "forward") == 2 * unit
        assert sim.ledger.bytes_sent(rank, "backward") == 6 * unit


def test_rsa_schedule_message_by_message():
    """W=3, rank 1: forward K then V hop to rank 2; backward all-reduce dV, V, all-reduce dK, K."""
    q, k, v, dout = tensors(0, (1, 6, 2, 4), (1, 6, 1, 4), (1, 6, 1, 4), (1, 6, 2, 4))
    sim = oracle.simulate("rsa", q, k, v, dout, world=3)
    rank1 = [(e.op, e.peer, e.nbytes, e.phase, e.step) for e in sim.ledger.messages(rank=1)]
    kv_block = 1 * 2 * 1 * 4 * 8  # B·(S/W)·Hkv·D float64
    full_gradient = wire_bytes("all_reduce", 1 * 6 * 1 * 4 * 8, 3)  # (B, S, Hkv, D) float64

    def hops(phase):
        return [("send", 2, kv_block, phase, step) for step in (0, 1)]

    all_reduce = [("all_reduce", None, full_gradient, "backward", 0)]
    forward = hops("forward") + hops("forward")
    assert rank1 == forward + all_reduce + hops("backward") + all_reduce + hops("backward")
    assert full_gradient == 2 * 2 * kv_block  # a ring all-reduce costs 2(W-1)/W of the tensor


def test_world_of_one_sends_nothing():
    """W=1 is plain attention: no message at all (size-1 groups log nothing)."""
    q, k, v, dout = tensors(1, (1, 4, 2, 4), (1, 4, 1, 4), (1, 4, 1, 4), (1, 4, 2, 4))
    assert oracle.simulate("rsa", q, k, v, dout, world=1).ledger.messages() == []


def _saved_probability_bytes(seq_len, world):
    """What rank 0 saves beyond its q, k, v shards (B=1, Hq=2, Hkv=1, D=4, float64)."""
    q, k, v = tensors(2, (1, seq_len, 2, 4), (1, seq_len, 1, 4), (1, seq_len, 1, 4))
    shards = (q.nbytes + k.nbytes + v.nbytes) // world
    return oracle.simulate("rsa", q, k, v, world=world).ranks[0].saved_bytes - shards


def test_rsa_saved_probabilities_grow_as_s_squared_over_w():
    """The stored P is B·Hq·(S/W)·S: doubling S multiplies it by 4, doubling W halves it."""
    base = _saved_probability_bytes(16, 2)
    assert base == 1 * 2 * 8 * 16 * 8  # B·Hq·(S/W)·S float64
    assert _saved_probability_bytes(32, 2) == 4 * base
    assert 2 * _saved_probability_bytes(16, 4) == base


def test_rsa_useful_work_is_full_attention_without_recomputation():
    """Summed over ranks: forward 2·D MACs per visible pair (QK, PV), backward 4·D (P is kept)."""
    batch, seq_len, heads_q, head_dim = 2, 16, 4, 8
    q, k, v, dout = tensors(3, *[(batch, seq_len, heads_q, head_dim)] * 4)
    sim = oracle.simulate("rsa", q, k, v, dout, world=4, causal=True, layout="striped")
    per_product = batch * heads_q * head_dim * seq_len * (seq_len + 1) // 2  # causal pairs
    assert sim.ledger.macs(phase="forward") == 2 * per_product
    assert sim.ledger.macs(phase="backward") == 4 * per_product


def test_rsa_skips_fully_masked_blocks_but_still_sends_them():
    """Contiguous causal W=4: rank 0 computes only on its own block, yet forwards every block."""
    q, k, v = tensors(4, (1, 8, 1, 2), (1, 8, 1, 2), (1, 8, 1, 2))
    sim = oracle.simulate("rsa", q, k, v, world=4, causal=True)
    computed = [e.step for e in sim.ledger.events if e.op == "compute" and e.rank == 0]
    assert computed == [0, 0]  # the K ring's step 0, then the V ring's
    assert len(sim.ledger.messages(rank=0)) == 2 * 3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rsa_16_bit_is_no_worse_than_plain_attention(dtype, causal):
    """16-bit inputs (P stored in 16 bits too) are as accurate as plain 16-bit attention."""
    assert_16_bit_no_worse_than_plain_attention("rsa", dtype, causal)


def test_uneven_blocks_travel_at_their_own_sizes():
    """W=3, S=7 contiguous (blocks of 3, 2, 2 tokens): rank 0 forwards its own block and then
    rank 2's, never rank 1's (the next rank's), each at its size; the all-reduces are
    full-length whatever S_r; its P rows are (B, Hq, 3, 7)."""
    q, k, v, dout = tensors(0, (1, 7, 2, 4), (1, 7, 1, 4), (1, 7, 1, 4), (1, 7, 2, 4))
    sim = oracle.simulate("rsa", q, k, v, dout, world=3)
    token = 1 * 1 * 4 * 8  # one token of K (B, 1, Hkv, D) float64
    full_gradient = wire_bytes("all_reduce", 7 * token, 3)  # (B, S, Hkv, D) float64
    rank0 = [(e.op, e.nbytes, e.phase) for e in sim.ledger.messages(rank=0)]
    ring = [("send", 3 * token, "forward"), ("send", 2 * token, "forward")]  # blocks 0, 2
    backward_ring = [(op, n, "backward") for op, n, _ in ring]
    all_reduce = [("all_reduce", full_gradient, "backward")]
    assert rank0 == ring + ring + all_reduce + backward_ring + all_reduce + backward_ring
    shards = (q.nbytes + k.nbytes + v.nbytes) * 3 // 7  # rank 0's 3 of 7 tokens
    assert sim.ranks[0].saved_bytes == shards + 1 * 2 * 3 * 7 * 8  # + P (B, Hq, 3, 7)
