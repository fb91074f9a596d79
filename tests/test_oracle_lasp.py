"""The LASP and LASP-2 oracles: exact, with the state messages and memory of sptutor.cost."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import blocks, checks, cost, oracle, work
from sptutor.testing import assert_close, assert_no_worse_than_baseline
from tests.helpers import SIXTEEN_BIT_SIZES, assert_ledger_matches_cost, state_after
from tests.strategies import attention_inputs, decays, heads, tensors

# float64 oracle vs float64 ground truth: the same sums reordered (the design's float64
# tolerance). Linear outputs grow with S, so errors are relative (assert_close, 1e-10): ~1e-16
# observed, real bugs are >1e-3.

METHODS = ("lasp", "lasp2")


@st.composite
def linear_case(
    draw, max_world: int = 8, max_chunk: int = 3, head_dims=(1, 3, 8, 16), min_seq_len: int = 1
):
    """Full float64 inputs and options of one linear-attention simulation (contiguous layout)."""
    world = draw(st.integers(1, max_world))
    fewest = -(-min_seq_len // world)  # the shortest chunk that reaches min_seq_len
    chunk = draw(st.integers(fewest, fewest + max_chunk - 1))
    (heads_q, heads_kv), causal = draw(heads()), draw(st.booleans())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(head_dims))
    seq_len = world * chunk
    q, k, v, dout = attention_inputs(
        draw(st.integers(0, 10**6)), batch, seq_len, heads_q, heads_kv, head_dim
    )
    decay = draw(decays(heads_q)) if causal else None
    return dict(q=q, k=k, v=v, dout=dout, world=world, causal=causal, decay=decay)


def simulate(method, case, dtype=torch.float64, **changes):
    """oracle.simulate on the case's inputs cast to ``dtype``, with options overridden."""
    case = case | changes
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    return oracle.simulate(method, q, k, v, dout, world=case["world"], causal=case["causal"],
                           decay=case["decay"])  # fmt: skip


def full_linear_with_grads(q, k, v, dout, causal, decay):
    """out of full linear attention and dq, dk, dv by autograd, in the inputs' dtype."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = oracle.full_linear_attention(q, k, v, causal=causal, decay=decay)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("method", METHODS)
@given(case=linear_case())
def test_oracle_equals_full_linear_attention(method, case):
    """out, dq, dk, dv == full linear attention and its autograd (W 1..8, decay, GQA, odd D)."""
    sim = simulate(method, case)
    q, k, v, dout = (case[n] for n in ("q", "k", "v", "dout"))
    expected = full_linear_with_grads(q, k, v, dout, case["causal"], case["decay"])
    for name, want in zip(("out", "dq", "dk", "dv"), expected):
        assert_close(getattr(sim, name), want, what=f"{method} {name}")


@pytest.mark.parametrize("method", METHODS)
@given(
    case=linear_case(**SIXTEEN_BIT_SIZES), dtype=st.sampled_from([torch.float16, torch.bfloat16])
)
def test_16_bit_oracle_is_no_worse_than_plain_linear_attention(method, case, dtype):
    """fp16/bf16 LASP(-2): out, dq, dk, dv no worse than plain linear attention in that dtype."""
    # decay rounded to bfloat16 first: exact in both 16-bit formats, so neither side pays for
    # rounding a rate that decay^S would amplify (0.99 in fp16 is off by 2e-4: 1% at S=64)
    decay = None if case["decay"] is None else case["decay"].to(torch.bfloat16).double()
    q, k, v, dout = (case[n] for n in ("q", "k", "v", "dout"))
    truth = full_linear_with_grads(q, k, v, dout, case["causal"], decay)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    low_decay = None if decay is None else decay.to(dtype)
    baseline = full_linear_with_grads(*low, case["causal"], low_decay)
    sim = oracle.simulate(method, *low, world=case["world"], causal=case["causal"],
                          decay=low_decay)  # fmt: skip
    # the 16-bit rule (sptutor.testing), at sizes where it is stable (tests.helpers)
    for name, base, want in zip(("out", "dq", "dk", "dv"), baseline, truth):
        kind = "output" if name == "out" else "gradient"
        assert_no_worse_than_baseline(getattr(sim, name), base, want, kind=kind, what=name)


@pytest.mark.parametrize("method", METHODS)
@given(case=linear_case())
def test_each_rank_keeps_the_state_before_its_chunk(method, case):
    """state_in: KV_p0 by definition (None on rank 0) causal, KV_total non-causal."""
    sim = simulate(method, case)
    q, k, v, world = case["q"], case["k"], case["v"], case["world"]
    seq_len, heads_q = q.shape[1], q.shape[2]
    for rank, record in enumerate(sim.ranks):
        end = rank * seq_len // world if case["causal"] else seq_len
        if end == 0:
            assert record.state_in is None
        else:
            assert_close(record.state_in, state_after(k, v, case["decay"], end, heads_q))


@pytest.mark.parametrize("method", METHODS)
@given(case=linear_case(), dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_ledger_and_saved_bytes_equal_the_closed_form(method, case, dtype):
    """Bytes sent per rank and phase, and bytes saved, equal sptutor.cost exactly (states in the
    accumulation dtype: float32 for float16 inputs)."""
    sim = simulate(method, case, dtype)
    shape = cost.Shape.of(case["q"].to(dtype), case["k"])
    expected = cost.of(method, shape, case["world"], causal=case["causal"])
    assert_ledger_matches_cost(sim, expected)
    states = [r.state_in for r in sim.ranks if r.state_in is not None]
    assert all(s.dtype == blocks.accumulation_dtype(dtype) for s in states)


@pytest.mark.parametrize("method", METHODS)
@given(case=linear_case(max_chunk=2))
def test_bytes_on_the_wire_do_not_grow_with_the_sequence(method, case):
    """Doubling S (same W, B, H, D) leaves every rank's bytes sent unchanged: states are D×D."""
    longer = {n: torch.cat([case[n], case[n].flip(1)], dim=1) for n in ("q", "k", "v", "dout")}
    short, long = simulate(method, case), simulate(method, case, **longer)
    for phase in ("forward", "backward"):
        for rank in range(case["world"]):
            assert short.ledger.bytes_sent(rank, phase) == long.ledger.bytes_sent(rank, phase)


@given(case=linear_case())
def test_lasp_and_lasp2_agree_and_differ_only_in_how_states_travel(case):
    """Same results; per phase LASP sends W-1 states one hop each, in W-1 steps (causal), while
    LASP-2 gathers in one step, every rank putting state·(W-1) on the wire."""
    chain, gather = simulate("lasp", case), simulate("lasp2", case)
    for name in ("out", "dq", "dk", "dv"):
        assert_close(getattr(chain, name), getattr(gather, name), what=name)
    world, q = case["world"], case["q"]
    state = q.shape[0] * q.shape[2] * q.shape[3] ** 2 * 8  # B·Hq·D² float64
    for phase in ("forward", "backward"):
        gathers = [e for e in gather.ledger.messages() if e.phase == phase]
        assert [(e.op, e.step, e.nbytes) for e in gathers] == (
            [("all_gather", 0, state * (world - 1))] * world if world > 1 else []
        )
        if case["causal"]:
            sends = [e for e in chain.ledger.messages() if e.phase == phase]
            assert sorted(e.step for e in sends) == list(range(world - 1))
            assert {e.nbytes for e in sends} <= {state}
            assert gather.ledger.bytes_sent(phase=phase) == world * chain.ledger.bytes_sent(
                phase=phase
            )


def test_lasp_chain_message_by_message():
    """W=3 causal: KV goes 0->1->2 forward, dKV 2->1->0 backward, one state per step."""
    q, k, v, dout = tensors(0, (1, 6, 2, 4), (1, 6, 1, 4), (1, 6, 1, 4), (1, 6, 2, 4))
    sim = oracle.simulate("lasp", q, k, v, dout, world=3, causal=True)
    messages = [(e.op, e.rank, e.peer, e.phase, e.step) for e in sim.ledger.messages()]
    assert messages == [
        ("send", 0, 1, "forward", 0), ("send", 1, 2, "forward", 1),
        ("send", 2, 1, "backward", 0), ("send", 1, 0, "backward", 1),
    ]  # fmt: skip
    assert {e.nbytes for e in sim.ledger.messages()} == {1 * 2 * 4 * 4 * 8}  # B·Hq·D² float64
    noncausal = oracle.simulate("lasp", q, k, v, dout, world=3)
    assert [(e.op, e.phase) for e in noncausal.ledger.messages()] == (
        [("all_reduce", "forward")] * 3 + [("all_reduce", "backward")] * 3
    )


def _event_index(events, rank, op, phase, nth=0, peer=None):
    """Index in the ledger of rank's nth event of kind op in phase (to a given peer)."""
    hits = [
        i for i, e in enumerate(events)
        if e.rank == rank and e.op == op and e.phase == phase and (peer is None or e.peer == peer)
    ]  # fmt: skip
    return hits[nth]


@given(world=st.integers(2, 6), chunk=st.integers(1, 4))
def test_intra_chunk_work_never_waits_for_the_chain(world, chunk):
    """LASP causal: each rank's intra-chunk compute is logged before the state it receives,
    and its readout (forward) or dk, dv from dKV (backward) only after it arrives."""
    seq_len = world * chunk
    q, k, v, dout = tensors(1, *[(1, seq_len, 2, 3)] * 4)
    events = oracle.simulate("lasp", q, k, v, dout, world=world, causal=True).ledger.events
    intra = work.linear_macs("intra", 1, 2, chunk, 3)
    for rank in range(1, world):
        first = _event_index(events, rank, "compute", "forward")
        assert events[first].macs == intra
        arrival = _event_index(events, rank - 1, "send", "forward", peer=rank)
        assert first < arrival < _event_index(events, rank, "compute", "forward", -1)
    for rank in range(world - 1):
        first = _event_index(events, rank, "compute", "backward")
        arrival = _event_index(events, rank + 1, "send", "backward", peer=rank)
        assert first < arrival < _event_index(events, rank, "compute", "backward", -1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_world_of_one_sends_nothing(method, causal):
    """W=1 is plain linear attention: no message at all."""
    q, k, v, dout = tensors(2, *[(1, 4, 2, 4)] * 4)
    sim = oracle.simulate(method, q, k, v, dout, world=1, causal=causal)
    assert sim.ledger.messages() == []


def test_only_the_contiguous_layout_is_accepted():
    """Zigzag or striped would break the chain's sequence order: a ValueError that says so."""
    checks.check_linear_layout("contiguous")
    message = "lasp and lasp2 need the contiguous layout"
    for lay in ("zigzag", "striped"):
        with pytest.raises(ValueError, match=re.escape(f"{message}: the state runs")):
            checks.check_linear_layout(lay)
        q, k, v = tensors(3, *[(1, 8, 2, 4)] * 3)
        with pytest.raises(ValueError, match=message):
            oracle.simulate("lasp2", q, k, v, world=2, causal=True, layout=lay)
