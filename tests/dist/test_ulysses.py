"""Real DeepSpeed-Ulysses on 4 gloo processes == its oracle, shard by shard, message by message."""

import torch
from hypothesis import Phase, given, settings

import sptutor
from sptutor import launch, ledger
from sptutor.testing import Case
from tests.dist.harness import GROUPS, assert_real_matches_oracle, ulysses_case_lists

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
    """W 1..4, layouts, causal, MHA/GQA/MQA (K/V heads replicated when Hkv < W), float64/float32:
    shards, ledger, and bytes sent and saved (hooks) == oracle == sptutor.cost; saved is O(S/W)."""
    results = assert_real_matches_oracle(cases + SAVED_GRID)
    assert_saved_is_o_s_over_w(SAVED_GRID, results[len(cases) :])


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    q = torch.randn(1, 3, 4, 8)  # S/W = 3, so S = 12 over W = 4
    calls = {
        "zigzag": lambda: sptutor.ulysses_attention(q, q, q, layout="zigzag"),
        "kv heads": lambda: sptutor.ulysses_attention(
            torch.randn(1, 3, 12, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)
        ),
        "q heads": lambda: sptutor.ulysses_attention(*[torch.randn(1, 3, 6, 8)] * 3),
        "sequence": lambda: sptutor.ulysses_attention(q, *[torch.randn(1, 4, 4, 8)] * 2),
        "dtype": lambda: sptutor.ulysses_attention(q, q.double(), q.double()),
        "backend": lambda: sptutor.ulysses_attention(q, q, q, backend="cuda-magic"),
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


def test_bad_input_raises_before_any_communication():
    """Bad layouts, heads, shapes, dtypes or backends raise on every rank, sending nothing."""
    rule = "ValueError: ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), got"
    for messages, events in launch.spawn(_bad_calls, 4):
        assert events == 0
        assert messages["zigzag"] == "ValueError: zigzag layout needs S % (2*W) == 0, got S=12, W=4"
        assert messages["kv heads"] == f"{rule} Hq=12, Hkv=3, U=4"
        assert messages["q heads"] == f"{rule} Hq=6, Hkv=6, U=4"
        assert messages["sequence"] == (
            "ValueError: q and k must have one sequence length, got 3 and 4"
        )
        assert messages["dtype"].startswith("TypeError: q, k, v need one floating dtype")
        assert "backend must be one of" in messages["backend"]
