"""Shared checks: an oracle simulation against full attention and its autograd gradients."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from sptutor import cost, oracle
from sptutor.testing import assert_close, assert_no_worse_than_baseline
from tests.strategies import heads, tensors, world_and_seq

# float64 oracle vs float64 ground truth: the same math reordered (DESIGN §7), relative 1e-10.


@st.composite
def softmax_case(draw, max_world: int = 8, head_dims=(1, 3, 8, 24, 40, 72)):
    """Full float64 inputs and options for one softmax-attention simulation."""
    world, lay, seq_len = draw(world_and_seq(max_world=max_world, max_chunk=2))
    heads_q, heads_kv = draw(heads())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(head_dims))
    q, k, v, dout = tensors(
        draw(st.integers(0, 10**6)),
        (batch, seq_len, heads_q, head_dim),
        (batch, seq_len, heads_kv, head_dim),
        (batch, seq_len, heads_kv, head_dim),
        (batch, seq_len, heads_q, head_dim),
    )
    # scores have std ~ scale·sqrt(D): keep it within 0.2..3 (realistic). A saturated softmax makes
    # dq, dk tiny by cancellation in P(dP - delta) and their *relative* error meaningless.
    scale = draw(st.one_of(st.none(), st.floats(0.2, 3.0).map(lambda f: f * head_dim**-0.5)))
    return dict(q=q, k=k, v=v, dout=dout, world=world, layout=lay, causal=draw(st.booleans()),
                scale=scale)  # fmt: skip


def full_attention_with_grads(q, k, v, dout, causal, scale):
    """out, lse of full attention and dq, dk, dv by autograd."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = oracle.full_attention(q, k, v, causal=causal, scale=scale)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_simulation_is_exact(method: str, case: dict, **options) -> oracle.Simulation:
    """simulate(method) == full attention (out, lse, dq, dk, dv), float64, relative 1e-10."""
    sim = oracle.simulate(
        method, case["q"], case["k"], case["v"], case["dout"], world=case["world"],
        causal=case["causal"], layout=case["layout"], scale=case["scale"], **options,
    )  # fmt: skip
    expected = full_attention_with_grads(
        case["q"], case["k"], case["v"], case["dout"], case["causal"], case["scale"]
    )
    for name, want in zip(("out", "lse", "dq", "dk", "dv"), expected):
        assert_close(getattr(sim, name), want, what=f"{method} {name}")
    return sim


def assert_ledger_matches_cost(sim: oracle.Simulation, expected: cost.Cost) -> None:
    """Bytes each rank sends per phase, and bytes it saves, equal the closed form exactly."""
    world = len(sim.ranks)
    assert [sim.ledger.bytes_sent(r, "forward") for r in range(world)] == list(expected.forward)
    assert [sim.ledger.bytes_sent(r, "backward") for r in range(world)] == list(expected.backward)
    assert [record.saved_bytes for record in sim.ranks] == list(expected.saved)


def assert_16_bit_no_worse_than_plain_attention(method: str, dtype: torch.dtype, causal: bool):
    """simulate(method) in ``dtype`` vs float64 truth, no worse than full attention in ``dtype``.

    16-bit rounding depends on the data, so no fixed tolerance is honest (DESIGN §7): the bar is
    plain attention run in the same dtype, factor 2 for out and lse, 3 for gradients.
    """
    shapes = (2, 64, 4, 32), (2, 64, 2, 32), (2, 64, 2, 32), (2, 64, 4, 32)
    q, k, v, dout = tensors(7, *shapes)
    truth = full_attention_with_grads(q, k, v, dout, causal, None)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    baseline = full_attention_with_grads(*low, causal, None)
    sim = oracle.simulate(method, *low, world=4, causal=causal, layout="zigzag")
    for name, base, want in zip(("out", "lse", "dq", "dk", "dv"), baseline, truth):
        kind = "gradient" if name.startswith("d") else "output"
        assert_no_worse_than_baseline(getattr(sim, name), base, want, kind=kind, what=name)
