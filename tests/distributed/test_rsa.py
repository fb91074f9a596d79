"""Real Ring Self-Attention on 4 gloo processes == its oracle, shard by shard, message by message,
and it keeps the paper's O(S²/W) score rows for backward, byte for byte."""

import itertools

import torch
from hypothesis import Phase, given, settings

from sptutor.testing import Case
from tests.distributed.harness import (
    assert_real_matches_oracle,
    per_group,
    softmax_cases,
)

# S in {16, 32} on W in {2, 4} (sub-group (2, 3) and the whole launch), float32 and float64
MEMORY_GRID = [
    Case(method="rsa", members=members, layout="contiguous", causal=False, batch=1,
         seq_len=seq_len, heads_q=2, heads_kv=1, head_dim=4, dtype=dtype)
    for seq_len, members, dtype in itertools.product(
        (16, 32), ((2, 3), (0, 1, 2, 3)), ("float32", "float64")
    )
]  # fmt: skip


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("rsa", members)))
def test_real_rsa_matches_the_oracle(cases):
    """W 1..4, layouts, causal, GQA/MQA, float64/float32/float16: shards, ledger and saved bytes."""
    results = assert_real_matches_oracle(cases + MEMORY_GRID)
    assert_saved_bytes_formula(MEMORY_GRID, results[len(cases) :])


def assert_saved_bytes_formula(grid, results):
    """Beyond the q, k, v shards, RSA keeps exactly P: B·Hq·(S/W)·S elements, the paper's
    B·Z·L²/N term (real == oracle == cost.rsa is checked by the harness)."""
    for case, per_rank in zip(grid, results):
        W, dtype = len(case.members), getattr(torch, case.dtype)
        shard = case.batch * (case.seq_len // W) * case.head_dim * dtype.itemsize
        qkv_shards = shard * (case.heads_q + 2 * case.heads_kv)
        probs = case.batch * case.heads_q * (case.seq_len // W) * case.seq_len * dtype.itemsize
        assert all(result["saved"] == qkv_shards + probs for result in per_rank.values()), case
