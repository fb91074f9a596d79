"""Real Ring Self-Attention on 4 gloo processes == its oracle, shard by shard, message by message,
and it keeps the paper's O(S²/W) score rows for backward, byte for byte."""

import itertools

import pytest
import torch
from hypothesis import Phase, given, settings

import sptutor
from sptutor import cost, launch, ledger
from sptutor.testing import Case, compare_with_oracle
from tests.dist.harness import (
    LAUNCH_WORLD,
    assert_real_matches_oracle,
    per_group,
    run_on_rank,
    softmax_cases,
)


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("rsa", members)))
def test_real_rsa_matches_the_oracle(cases):
    """W 1..4, layouts, causal, GQA/MQA, float64/float32: shards, ledger and saved bytes."""
    assert_real_matches_oracle(cases)


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    q = torch.randn(1, 3, 2, 8)  # S/W = 3, so S = 12
    calls = {
        "zigzag": lambda: sptutor.rsa_attention(q, q, q, layout="zigzag"),
        "heads": lambda: sptutor.rsa_attention(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)),
        "dtype": lambda: sptutor.rsa_attention(q, q.double(), q.double()),
        "backend": lambda: sptutor.rsa_attention(q, q, q, backend="cuda-magic"),
    }
    messages = {}
    with ledger.record() as led:
        for name, call in calls.items():
            try:
                call()
                messages[name] = None
            except (ValueError, TypeError) as error:
                messages[name] = f"{type(error).__name__}: {error}"
    return messages, len(led.events)


def test_bad_input_raises_before_any_communication(fixed_checks):
    """Bad layouts, heads, dtypes or backends raise ValueError/TypeError on every rank, sending
    nothing (a backend name is checked even though RSA always computes on torch)."""
    for (messages, events), _ in fixed_checks:
        assert events == 0
        assert messages["zigzag"] == "ValueError: zigzag layout needs S % (2*W) == 0, got S=12, W=4"
        assert messages["heads"] == "ValueError: need Hq % Hkv == 0, got Hq=2, Hkv=3"
        assert messages["dtype"].startswith("TypeError: q, k, v need one floating dtype")
        assert "backend must be one of" in messages["backend"]


# S in {16, 32} on W in {2, 4} (sub-group (2, 3) and the whole launch), float32 and float64
MEMORY_GRID = [
    Case(method="rsa", members=members, layout="contiguous", causal=False, batch=1,
         seq_len=seq_len, heads_q=2, heads_kv=1, head_dim=4, dtype=dtype)
    for seq_len, members, dtype in itertools.product(
        (16, 32), ((2, 3), (0, 1, 2, 3)), ("float32", "float64")
    )
]  # fmt: skip


def _fixed_checks(rank, world):
    """The bad calls first (nothing may be sent), then the memory grid: one launch for both."""
    return _bad_calls(rank, world), run_on_rank(rank, world, MEMORY_GRID)


@pytest.fixture(scope="module")
def fixed_checks():
    """Each rank's (bad-call messages and event count, memory-grid results); one launch."""
    return launch.spawn(_fixed_checks, LAUNCH_WORLD)


def test_saved_bytes_are_the_papers_s_squared_over_w(fixed_checks):
    """Bytes autograd keeps (saved_tensors_hooks) == oracle == cost.rsa; beyond the q, k, v shards
    they are exactly P: B·Hq·(S/W)·S elements, the paper's B·Z·L²/N term."""
    results = [memory for _, memory in fixed_checks]
    for index, case in enumerate(MEMORY_GRID):
        W, dtype = len(case.members), getattr(torch, case.dtype)
        shape = cost.Shape(case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim,
                           dtype)  # fmt: skip
        per_rank = {rank: results[rank][index] for rank in case.members}
        qkv_shards = shape.tokens_bytes(case.seq_len // W, case.heads_q + 2 * case.heads_kv)
        probs = case.batch * case.heads_q * (case.seq_len // W) * case.seq_len * dtype.itemsize
        for comparison, expected in zip(
            compare_with_oracle(case, per_rank), cost.rsa(shape, W).saved
        ):
            assert not comparison.problems(dtype), case
            assert comparison.saved_bytes == comparison.oracle_saved_bytes == expected, case
            assert comparison.saved_bytes == qkv_shards + probs, case
