"""The DeepSpeed-Ulysses oracle: exact, with the all-to-all schedule and memory of sptutor.cost."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import cost, layout, oracle
from sptutor.checks import check_ulysses_heads
from sptutor.oracle import ulysses
from sptutor.oracle.world import World
from sptutor.testing import assert_close
from tests.helpers import (
    SIXTEEN_BIT_SIZES,
    assert_16_bit_case_no_worse,
    assert_ledger_matches_cost,
    assert_simulation_is_exact,
    mesh_case,
)
from tests.strategies import tensors


@given(mesh_case(pure_ulysses=True))
def test_ulysses_oracle_equals_full_attention(case):
    """Ulysses (any W 1..8, layout, causal, MHA/GQA/MQA incl. replicated K/V, odd D) == full."""
    assert_simulation_is_exact("ulysses", case)


@given(mesh_case(pure_ulysses=True), st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_ulysses_ledger_and_saved_bytes_equal_the_closed_form(case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost.ulysses exactly."""
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    sim = oracle.simulate("ulysses", q, k, v, dout, world=case["world"], causal=case["causal"],
                          layout=case["layout"])  # fmt: skip
    assert_ledger_matches_cost(sim, cost.ulysses(cost.Shape.of(q, k), case["world"]))


@given(
    mesh_case(pure_ulysses=True, **SIXTEEN_BIT_SIZES),
    st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_16_bit_ulysses_is_no_worse_than_plain_attention(case, dtype):
    """fp16/bf16 Ulysses: out, lse, dq, dk, dv no worse than plain attention in the same dtype."""
    # the 16-bit rule (sptutor.testing), at sizes where it is stable (tests.helpers)
    assert_16_bit_case_no_worse("ulysses", case, dtype)


def test_ulysses_schedule_message_by_message():
    """W=2, MQA: a2a of q, k, v, out forward and dout, dq, dk, dv backward; the LSE is free."""
    q, k, v, dout = tensors(0, (1, 6, 4, 4), (1, 6, 1, 4), (1, 6, 1, 4), (1, 6, 4, 4))
    sim = oracle.simulate("ulysses", q, k, v, dout, world=2, causal=True)
    q_like = 1 * 3 * 4 * 4 * 8 // 2  # half of this rank's (B, S/W, Hq, D) float64 leaves it
    kv_like = 1 * 3 * 2 * 4 * 8 // 2  # K's one head is replicated W=2 times before the all-to-all
    forward = [(n, "forward") for n in (q_like, kv_like, kv_like, q_like)]  # q, k, v, out
    backward = [(n, "backward") for n in (q_like, q_like, kv_like, kv_like)]  # dout, dq, dk, dv
    for rank in range(2):
        events = [(e.op, e.peer, e.nbytes, e.phase, e.step) for e in sim.ledger.messages(rank)]
        assert events == [("all_to_all", None, n, phase, 0) for n, phase in forward + backward]
        assert sim.ranks[rank].lse.shape == (1, 4, 3)  # (B, Hq, S/W), gathered without a message


def test_replicated_kv_heads_pair_with_their_query_heads():
    """W=4, Hq=8, Hkv=2: rank j gets K head j // 2, the one its query heads 2j, 2j+1 use (GQA)."""
    q, k, v = tensors(1, (1, 8, 8, 3), (1, 8, 2, 3), (1, 8, 2, 3))
    world = World(list(range(4)))
    shards = [layout.shard(x, world=4) for x in (q, k, v)]
    q_heads, k_heads, _ = ulysses._qkv_to_heads(world, *shards, [2] * 4)  # S_r = 8/4 each
    for rank in range(4):
        assert torch.equal(q_heads[rank], q[:, :, 2 * rank : 2 * rank + 2])  # (B, S, Hq/W, D)
        assert torch.equal(k_heads[rank], k[:, :, rank // 2 : rank // 2 + 1])  # (B, S, 1, D)


def test_every_rank_does_the_same_work_under_a_causal_mask():
    """Ulysses needs no load balancing: each rank attends the whole sequence on H/W heads."""
    q, k, v, dout = tensors(2, (1, 16, 4, 8), (1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 4, 8))
    sim = oracle.simulate("ulysses", q, k, v, dout, world=4, causal=True)
    for phase in ("forward", "backward"):
        assert len({sim.ledger.macs(rank=r, phase=phase) for r in range(4)}) == 1


def test_world_of_one_sends_nothing():
    """W=1 is plain attention: no message at all (size-1 groups log nothing)."""
    q, k, v, dout = tensors(3, (1, 4, 2, 4), (1, 4, 2, 4), (1, 4, 2, 4), (1, 4, 2, 4))
    assert oracle.simulate("ulysses", q, k, v, dout, world=1).ledger.messages() == []


@pytest.mark.parametrize(
    ("heads_q", "heads_kv", "world"), [(6, 3, 2), (3, 1, 2), (4, 4, 8), (12, 6, 4)]
)
def test_bad_head_counts_raise_before_any_message(heads_q, heads_kv, world):
    """Heads that split over no W (nor replicate) are ValueErrors naming Hq, Hkv and U."""
    q, k, v = tensors(4, (1, 16, heads_q, 4), (1, 16, heads_kv, 4), (1, 16, heads_kv, 4))
    message = f"got Hq={heads_q}, Hkv={heads_kv}, U={world}"
    with pytest.raises(ValueError, match=re.escape(message)):
        oracle.simulate("ulysses", q, k, v, world=world)


def test_head_rule_message():
    """The head rule's message is the design's example (Design, *Errors*)."""
    expected = "ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), got Hq=4, Hkv=3, U=2"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_ulysses_heads(4, 3, 2)
    check_ulysses_heads(8, 1, 4)  # MQA: one K/V head, replicated 4 times


def test_uneven_shards_travel_padded_and_are_kept_unpadded():
    """W=3, S=7 (shards 3, 2, 2): every all-to-all carries shards padded to L=3 tokens, so all
    ranks send the same bytes; the heads layout keeps the 7 real tokens (padding dropped)."""
    q, k, v, dout = tensors(5, (1, 7, 3, 4), (1, 7, 3, 4), (1, 7, 3, 4), (1, 7, 3, 4))
    sim = oracle.simulate("ulysses", q, k, v, dout, world=3, causal=True)
    padded = 1 * 3 * 3 * 4 * 8 * 2 // 3  # (B, L=3, H, D) float64: two thirds leave the rank
    for rank in range(3):
        events = [(e.op, e.nbytes, e.phase) for e in sim.ledger.messages(rank)]
        assert events == [
            ("all_to_all", padded, phase) for phase in ["forward"] * 4 + ["backward"] * 4
        ]
        heads_layout = 1 * 7 * 1 * 4 * 8  # (B, S, H/U, D) float64
        assert sim.ranks[rank].saved_bytes == 4 * heads_layout + 1 * 1 * 7 * 8  # + lse


def test_padding_is_never_attended():
    """W=4, S=5 (shards 2, 1, 1, 1; three ranks padded): the same out, lse and gradients as
    one rank, and no compute on a padding token (MACs are full attention's)."""
    q, k, v, dout = tensors(6, (2, 5, 4, 3), (2, 5, 2, 3), (2, 5, 2, 3), (2, 5, 4, 3))
    sim = oracle.simulate("ulysses", q, k, v, dout, world=4, causal=True)
    alone = oracle.simulate("ulysses", q, k, v, dout, world=1, causal=True)
    for name in ("out", "lse", "dq", "dk", "dv"):  # float64, sums reordered: the design's 1e-10
        assert_close(getattr(sim, name), getattr(alone, name), what=name)
    assert sim.ledger.macs() == alone.ledger.macs()
