"""Real ring attention on 4 gloo processes == its oracle, shard by shard, message by message."""

from hypothesis import Phase, given, settings

from tests.distributed.harness import assert_real_matches_oracle, per_group, softmax_cases


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("ring", members)))
def test_real_ring_matches_the_oracle(cases):
    """W 1..4, layouts, causal, GQA/MQA, float64/float32/float16: shards, ledger and saved bytes."""
    assert_real_matches_oracle(cases)
