"""The USP oracle: exact on every U x R mesh; U = W is Ulysses and U = 1 is ring, to the message."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import cost, oracle
from sptutor.oracle import usp
from sptutor.oracle.world import World
from tests.helpers import (
    SIXTEEN_BIT_SIZES,
    assert_16_bit_case_no_worse,
    assert_ledger_matches_cost,
    assert_simulation_is_exact,
    mesh_case,
    softmax_case,
)
from tests.strategies import tensors, uneven_mesh_case, uneven_softmax_case

DTYPES = [torch.float64, torch.float32, torch.float16]


def _simulate(method, case, **options):
    return oracle.simulate(
        method, case["q"], case["k"], case["v"], case["dout"], world=case["world"],
        causal=case["causal"], layout=case["layout"], scale=case["scale"],
        cu_seqlens=case.get("cu_seqlens"), **options,
    )  # fmt: skip


def _assert_same_run(sim, other):
    """Identical ledgers (messages and compute, in order) and bit-identical results."""
    assert sim.ledger.events == other.ledger.events
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(getattr(sim, name), getattr(other, name)), name


@given(mesh_case())
def test_usp_oracle_equals_full_attention(case):
    """USP (every U·R = W for W 1..8, layout, causal, MHA/GQA/MQA, odd D) == full attention."""
    assert_simulation_is_exact("usp", case, ulysses=case["ulysses"])


@given(mesh_case(), st.sampled_from(DTYPES))
def test_usp_ledger_and_saved_bytes_equal_the_closed_form(case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost.usp exactly."""
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    sim = oracle.simulate("usp", q, k, v, dout, world=case["world"], causal=case["causal"],
                          layout=case["layout"], ulysses=case["ulysses"])  # fmt: skip
    shape, degree = cost.Shape.of(q, k), case["ulysses"]
    assert_ledger_matches_cost(sim, cost.usp(shape, ulysses=degree, ring=case["world"] // degree))


@given(mesh_case(**SIXTEEN_BIT_SIZES), st.sampled_from([torch.float16, torch.bfloat16]))
def test_16_bit_usp_is_no_worse_than_plain_attention(case, dtype):
    """fp16/bf16 USP: out, lse, dq, dk, dv no worse than plain attention in the same dtype."""
    # the 16-bit rule (sptutor.testing), at sizes where it is stable (tests.helpers)
    assert_16_bit_case_no_worse("usp", case, dtype, ulysses=case["ulysses"])


@given(mesh_case(pure_ulysses=True))
def test_usp_with_all_ranks_in_one_ulysses_group_is_ulysses(case):
    """U = W (R = 1): the same messages, compute and results as ulysses, bit for bit.

    One ring rank owns the whole sequence under every layout, split contiguously over U ranks:
    the tokens ulysses' ranks hold under the contiguous layout.
    """
    ulysses_run = _simulate("ulysses", case | {"layout": "contiguous"})
    _assert_same_run(_simulate("usp", case, ulysses=case["world"]), ulysses_run)


@given(softmax_case())
def test_usp_with_one_rank_per_ulysses_group_is_ring(case):
    """U = 1 (R = W): the same messages, compute and results as ring attention, bit for bit."""
    _assert_same_run(_simulate("usp", case, ulysses=1), _simulate("ring", case))


@given(uneven_mesh_case(pure_ulysses=True))
def test_usp_is_ulysses_for_any_s_and_documents(case):
    """U = W, S any (shards padded to ceil(S/W) on the all-to-alls), documents or not: ulysses'
    messages, compute and results, bit for bit (the ring rank's tokens split as contiguous)."""
    ulysses_run = _simulate("ulysses", case | {"layout": "contiguous"})
    _assert_same_run(_simulate("usp", case, ulysses=case["world"]), ulysses_run)


@given(uneven_softmax_case())
def test_usp_is_ring_for_any_s_and_documents(case):
    """U = 1, S any (ring blocks of their own sizes, no padding), documents or not: ring
    attention's messages, compute and results, bit for bit."""
    _assert_same_run(_simulate("usp", case, ulysses=1), _simulate("ring", case))


def test_uneven_usp_schedule_message_by_message():
    """W=4 = 2x2, S=11 contiguous: ring ranks hold 6 and 5 tokens, ulysses ranks 3, 3 | 3, 2.
    Rank 3's group pads to L=3 on its all-to-alls; its ring blocks are 5 (own) and 6 tokens."""
    q, k, v, dout = tensors(3, (1, 11, 2, 4), (1, 11, 2, 4), (1, 11, 2, 4), (1, 11, 2, 4))
    sim = oracle.simulate("usp", q, k, v, dout, world=4, ulysses=2, causal=True)
    token = 1 * 1 * 4 * 8  # one token of one head (B, 1, H/U, D) float64
    a2a = ("all_to_all", None, 3 * 2 * token // 2)  # (B, L=3, H=2, D) padded, half leaves
    own, other = ("send", 1, 5 * token), ("send", 1, 6 * token)  # ring group (1, 3)
    events = [(e.op, e.peer, e.nbytes, e.phase, e.step) for e in sim.ledger.messages(rank=3)]
    forward = [(*a2a, "forward", 0)] * 3 + [(*own, "forward", 0)] * 2 + [(*a2a, "forward", 0)]
    backward = (
        [(*a2a, "backward", 0)]
        + [(*own, "backward", 0)] * 4  # K, V and the dK, dV accumulators of rank 3's block
        + [(*other, "backward", 1)] * 2  # the accumulators of rank 1's block, home
        + [(*a2a, "backward", 0)] * 3
    )
    assert events == forward + backward
    assert sim.ranks[3].out.shape == (1, 2, 2, 4)  # the padding dropped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads_q", "heads_kv"), [(8, 8), (8, 2), (8, 1)])
def test_usp_cost_reduces_to_ulysses_and_ring(dtype, heads_q, heads_kv):
    """cost.usp with U = W is cost.ulysses, with U = 1 cost.ring (W = 8, MHA/GQA/MQA)."""
    shape = cost.Shape(2, 64, heads_q, heads_kv, 24, dtype)
    assert cost.usp(shape, ulysses=8, ring=1) == cost.ulysses(shape, 8)
    assert cost.usp(shape, ulysses=1, ring=8) == cost.ring(shape, 8)


def test_usp_schedule_message_by_message():
    """W=4 = 2x2: a2a q, k, v in the ulysses group, K, V round the ring group, a2a back."""
    q, k, v, dout = tensors(0, (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4))
    sim = oracle.simulate("usp", q, k, v, dout, world=4, ulysses=2, layout="zigzag", causal=True)
    tensor = 1 * 2 * 2 * 4 * 8  # this rank's (B, S/W, H, D) float64: half leaves in an a2a
    block = 1 * 4 * 1 * 4 * 8  # a ring block (B, S/R, Hkv/U, D) float64
    a2a, to_next = ("all_to_all", None, tensor // 2), ("send", 3, block)  # ring group: 1, 3
    events = [(e.op, e.peer, e.nbytes, e.phase, e.step) for e in sim.ledger.messages(rank=1)]
    forward = [(*a2a, "forward", 0)] * 3 + [(*to_next, "forward", 0)] * 2 + [(*a2a, "forward", 0)]
    backward = (
        [(*a2a, "backward", 0)]  # dout
        + [(*to_next, "backward", 0)] * 4  # K, V and the dK, dV accumulators
        + [(*to_next, "backward", 1)] * 2  # dK, dV home
        + [(*a2a, "backward", 0)] * 3  # dq, dk, dv
    )
    assert events == forward + backward


def test_zigzag_balances_causal_work_over_the_whole_mesh():
    """Zigzag + causal on 4 = 2x2 and 8 = 2x4: every rank does exactly the same useful work."""
    for world, degree in ((4, 2), (8, 2)):
        q, k, v, dout = tensors(1, (1, 32, 4, 8), (1, 32, 2, 8), (1, 32, 2, 8), (1, 32, 4, 8))
        sim = oracle.simulate("usp", q, k, v, dout, world=world, ulysses=degree, causal=True,
                              layout="zigzag")  # fmt: skip
        for phase in ("forward", "backward"):
            assert len({sim.ledger.macs(rank=r, phase=phase) for r in range(world)}) == 1


@pytest.mark.parametrize(
    ("seq_len", "heads", "kwargs", "message"),
    [
        (16, (2, 2), dict(world=4, ulysses=3),
         "ulysses degree must divide the world, got W=4, U=3"),
        (7, (2, 2), dict(world=4, ulysses=2, layout="zigzag"),
         "zigzag layout needs S >= 2*W (2W chunks of at least one token), got S=7, W=4"),
        (6, (4, 4), dict(world=8, ulysses=4),
         "contiguous layout needs S >= W (every rank owns a token), got S=6, W=8"),
        (16, (6, 3), dict(world=4, ulysses=2), "got Hq=6, Hkv=3, U=2"),
        (16, (2, 2), dict(world=4), "ulysses= is required for usp and only for usp"),
    ],
)  # fmt: skip
def test_bad_options_raise(seq_len, heads, kwargs, message):
    """Meshes, sizes and heads that do not fit are ValueErrors naming the values."""
    heads_q, heads_kv = heads
    q, k, v = tensors(2, (1, seq_len, heads_q, 4), (1, seq_len, heads_kv, 4),
                      (1, seq_len, heads_kv, 4))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        oracle.simulate("usp", q, k, v, **kwargs)


def test_emulate_checks_the_mesh_itself():
    """Called directly, usp.emulate refuses U·R != W before logging anything."""
    world = World(list(range(4)))
    q = [torch.zeros(1, 2, 2, 4) for _ in range(4)]
    with pytest.raises(ValueError, match=re.escape("U must divide W, got W=4, U=3")):
        usp.emulate(world, q, q, q, None, positions=None, documents=[None] * 4, causal=False,
                    scale=1.0, ulysses=3)  # fmt: skip
    assert world.ledger.events == []
