"""Real LSS attention (our reading) on 4 gloo processes == its oracle, shard by shard, message by
message, and it keeps the whole sequence's K, V for backward: O(S) bytes whatever W."""

import torch
from hypothesis import Phase, given, settings

import sptutor
from sptutor import comm, launch
from tests.distributed.harness import (
    assert_real_matches_oracle,
    memory_grid,
    per_group,
    softmax_cases,
)

MEMORY_GRID = memory_grid("lss")


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("lss", members)))
def test_real_lss_matches_the_oracle(cases):
    """W 1..4, layouts, any S (shards padded on the collectives), packed documents, causal,
    GQA/MQA, float64/float32/float16: shards, ledger and saved bytes."""
    results = assert_real_matches_oracle(cases + MEMORY_GRID)
    assert_saved_bytes_formula(MEMORY_GRID, results[len(cases) :])


def assert_saved_bytes_formula(grid, results):
    """Beyond q, out and lse (O(S/W)), LSS keeps the gathered K and V, 2·B·S·Hkv·D elements:
    O(S), not divided by W (real == oracle == cost.lss is checked by the harness)."""
    for case, per_rank in zip(grid, results):
        W, dtype = len(case.members), getattr(torch, case.dtype)
        tokens, itemsize = case.seq_len // W, dtype.itemsize
        lse = case.batch * case.heads_q * tokens * itemsize  # float32/64 inputs: lse in their dtype
        local = 2 * case.batch * tokens * case.heads_q * case.head_dim * itemsize + lse
        gathered_kv = 2 * case.batch * case.seq_len * case.heads_kv * case.head_dim * itemsize
        assert all(result["saved"] == local + gathered_kv for result in per_rank.values()), case


def _gathered_buffer_is_saved(rank, world):
    """Does LSS save for backward the very buffer its all-gather filled (no O(S) copy after)?"""
    filled = []
    gather = comm._all_gather

    def recording(output, *args, **kwargs):
        filled.append(output.untyped_storage().data_ptr())
        return gather(output, *args, **kwargs)

    comm._all_gather = recording
    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sptutor.lss_attention(q, k, v, causal=True)
    return filled[0] in saved


def test_lss_keeps_the_gathered_buffer_not_a_copy():
    """The K, V LSS keeps are the all-gather's own output: O(S) bytes once, not twice."""
    assert launch.spawn(_gathered_buffer_is_saved, 2) == [True, True]
