"""Real DeepSpeed-Ulysses on 4 gloo processes == its oracle, shard by shard, message by message."""

from hypothesis import Phase, given, settings

from sptutor.testing import Case
from tests.distributed.harness import GROUPS, assert_real_matches_oracle, ulysses_case_lists

# saved bytes over S and W: Hq = Hkv = 12 split over every W in 1..4, so nothing is replicated
SAVED_GRID = [
    Case("ulysses", members, "contiguous", False, 1, seq_len, 12, 12, 4, "float32")
    for members in GROUPS
    for seq_len in (12, 24)
]


def assert_saved_is_o_s_over_w(grid, results):
    """Bytes each rank saves for backward, times W / S, are one constant over the grid: O(S/W)."""
    per_token = {
        rank_result["saved"] * len(case.members) / case.seq_len
        for case, per_rank in zip(grid, results)
        for rank_result in per_rank.values()
    }
    assert len(per_token) == 1, f"saved·W/S differs over the grid: {sorted(per_token)}"


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(ulysses_case_lists("ulysses", per_mesh=4))
def test_real_ulysses_matches_the_oracle_and_the_cost(cases):
    """W 1..4, layouts, any S (shards padded on the all-to-alls), packed documents, causal,
    MHA/GQA/MQA (K/V heads replicated when Hkv < W), float64, float32 and float16: shards,
    ledger, and bytes sent and saved (hooks) == oracle == sptutor.cost; saved is O(S/W)."""
    results = assert_real_matches_oracle(cases + SAVED_GRID)
    assert_saved_is_o_s_over_w(SAVED_GRID, results[len(cases) :])
