"""Real USP on 4 gloo processes (every U x R mesh of W 1..4) == its oracle, message by message."""

from hypothesis import Phase, given, settings

from sptutor.testing import Case
from tests.distributed.harness import GROUPS, assert_real_matches_oracle, ulysses_case_lists
from tests.distributed.test_ulysses import assert_saved_is_o_s_over_w

# saved bytes over S, W and every U·R = W: Hq = Hkv = 12 split over every U, nothing replicated
SAVED_GRID = [
    Case("usp", members, "contiguous", False, 1, seq_len, 12, 12, 4, "float32", ulysses=degree)
    for members in GROUPS
    for degree in range(1, len(members) + 1)
    if len(members) % degree == 0
    for seq_len in (12, 24)
]


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(ulysses_case_lists("usp", per_mesh=2))
def test_real_usp_matches_the_oracle_and_the_cost(cases):
    """W 1..4, every U·R = W, layouts, any S, packed documents, causal, MHA/GQA/MQA,
    float64/float32/float16: shards, ledger, and bytes sent and saved (hooks) == oracle ==
    sptutor.cost; saved is O(S/W) whatever U."""
    results = assert_real_matches_oracle(cases + SAVED_GRID)
    assert_saved_is_o_s_over_w(SAVED_GRID, results[len(cases) :])
