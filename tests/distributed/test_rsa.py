"""Real Ring Self-Attention on 4 gloo processes == its oracle, shard by shard, message by message,
and it keeps the paper's O(S²/W) score rows for backward, byte for byte."""

import torch
from hypothesis import Phase, given, settings

from tests.distributed.harness import (
    assert_real_matches_oracle,
    memory_grid,
    per_group,
    softmax_cases,
)

MEMORY_GRID = memory_grid("rsa")


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("rsa", members)))
def test_real_rsa_matches_the_oracle(cases):
    """W 1..4, layouts, any S (uneven shards), packed documents, causal, GQA/MQA, float64/32/16:
    shards, ledger and saved bytes."""
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
