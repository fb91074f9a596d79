"""Real LASP and LASP-2 on 4 gloo processes == their oracle, shard by shard, message by message."""

from hypothesis import Phase, example, given, settings

from sptutor.testing import Case
from tests.distributed.harness import assert_real_matches_oracle, linear_cases, per_group

ALL_RANKS = (0, 1, 2, 3)
# W = 4 chains and gathers, causal with decay and GQA, and non-causal, whatever hypothesis draws
W4_CASES = [
    Case(method, ALL_RANKS, "contiguous", causal, batch=2, seq_len=8, heads_q=4, heads_kv=2,
         head_dim=5, dtype=dtype, seed=7, decay=(0.9, 0.75, 0.6, 0.99) if causal else None)
    for method in ("lasp", "lasp2") for causal in (True, False)
    for dtype in ("float64", "float32", "float16")
]  # fmt: skip


# Tolerances (the design's, in sptutor.testing): float64 1e-10, float32 1e-5 relative to the oracle,
# float16 one unit in the last place (eps). Both sides run the same block maths in the same order;
# only the collectives' summation order may differ, so errors are a few ulps.
@settings(max_examples=1, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda m: linear_cases("lasp", m) | linear_cases("lasp2", m)))
@example(W4_CASES)
def test_real_lasp_and_lasp2_match_the_oracle(cases):
    """W 1..4, causal or not, decay, GQA/MQA, float64/32/16: shards, ledger and saved bytes
    equal the oracle's, and bytes sent and saved per rank equal sptutor.cost."""
    assert_real_matches_oracle(cases)
