"""Real LSS attention (our reading) on 4 gloo processes == its oracle, shard by shard, message by
message, and it keeps the whole sequence's K, V for backward: O(S) bytes whatever W."""

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
@given(per_group(lambda members: softmax_cases("lss", members)))
def test_real_lss_matches_the_oracle(cases):
    """W 1..4, layouts, causal, GQA/MQA, float64/float32: shards, ledger and saved bytes."""
    assert_real_matches_oracle(cases)


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    q = torch.randn(1, 3, 2, 8)  # S/W = 3, so S = 12
    calls = {
        "zigzag": lambda: sptutor.lss_attention(q, q, q, layout="zigzag"),
        "heads": lambda: sptutor.lss_attention(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)),
        "dtype": lambda: sptutor.lss_attention(q, q.double(), q.double()),
        "backend": lambda: sptutor.lss_attention(q, q, q, backend="cuda-magic"),
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
    nothing."""
    for (messages, events), _ in fixed_checks:
        assert events == 0
        assert messages["zigzag"] == "ValueError: zigzag layout needs S % (2*W) == 0, got S=12, W=4"
        assert messages["heads"] == "ValueError: need Hq % Hkv == 0, got Hq=2, Hkv=3"
        assert messages["dtype"].startswith("TypeError: q, k, v need one floating dtype")
        assert "backend must be one of" in messages["backend"]


# S in {16, 32} on W in {2, 4} (sub-group (2, 3) and the whole launch), float32 and float64
MEMORY_GRID = [
    Case(method="lss", members=members, layout="contiguous", causal=False, batch=1,
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


def test_saved_bytes_hold_the_whole_sequences_kv(fixed_checks):
    """Bytes autograd keeps (saved_tensors_hooks) == oracle == cost.lss; beyond q, out and lse
    (O(S/W)) they are the gathered K and V, 2·B·S·Hkv·D elements: O(S), not divided by W."""
    results = [memory for _, memory in fixed_checks]
    for index, case in enumerate(MEMORY_GRID):
        W, dtype = len(case.members), getattr(torch, case.dtype)
        shape = cost.Shape(case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim,
                           dtype)  # fmt: skip
        per_rank = {rank: results[rank][index] for rank in case.members}
        tokens = case.seq_len // W
        lse = case.batch * case.heads_q * tokens * shape.acc_itemsize
        local = 2 * shape.tokens_bytes(tokens, case.heads_q) + lse  # q and out, and lse
        gathered_kv = 2 * shape.tokens_bytes(case.seq_len, case.heads_kv)
        for comparison, expected in zip(
            compare_with_oracle(case, per_rank), cost.lss(shape, W).saved
        ):
            assert not comparison.problems(dtype), case
            assert comparison.saved_bytes == comparison.oracle_saved_bytes == expected, case
            assert comparison.saved_bytes == local + gathered_kv, case
