"""Real ring attention on 4 gloo processes == its oracle, shard by shard, message by message."""

import pytest
import torch
import torch.distributed as dist
from hypothesis import Phase, given, settings

import sptutor
from sptutor import launch, ledger
from tests.dist.harness import assert_real_matches_oracle, per_group, softmax_cases


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda members: softmax_cases("ring", members)))
def test_real_ring_matches_the_oracle(cases):
    """W 1..4, layouts, causal, GQA/MQA, float64/float32: shards, ledger and saved bytes."""
    assert_real_matches_oracle(cases)


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    q = torch.randn(1, 3, 2, 8)  # S/W = 3, so S = 12
    calls = {
        "zigzag": lambda: sptutor.ring_attention(q, q, q, layout="zigzag"),
        "heads": lambda: sptutor.ring_attention(
            q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)
        ),
        "dtype": lambda: sptutor.ring_attention(q, q.double(), q.double()),
        "backend": lambda: sptutor.ring_attention(q, q, q, backend="cuda-magic"),
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
    """Bad shapes, dtypes or backends raise ValueError/TypeError on every rank, sending nothing."""
    for messages, events in launch.spawn(_bad_calls, 4):
        assert events == 0
        assert messages["zigzag"] == "ValueError: zigzag layout needs S % (2*W) == 0, got S=12, W=4"
        assert messages["heads"] == "ValueError: need Hq % Hkv == 0, got Hq=2, Hkv=3"
        assert messages["dtype"].startswith("TypeError: q, k, v need one floating dtype")
        assert "backend must be one of" in messages["backend"]


def test_a_failing_rank_ends_the_launch_with_its_message():
    """Rank 2 fails its layout check while the others wait in the ring: spawn reports rank 2."""

    def body(rank, world):
        q = torch.randn(1, 3 if rank == 2 else 4, 1, 4)  # S/W differs on rank 2: S=12 % (2*4) != 0
        sptutor.ring_attention(q, q, q, layout="zigzag" if rank == 2 else "contiguous")

    with pytest.raises(launch.SpawnError, match=r"rank 2 of 4 failed(.|\n)*zigzag layout needs"):
        launch.spawn(body, 4, timeout=120)


def test_a_function_defined_in_a_test_runs_under_spawn():
    """spawn ships closures by value and returns each rank's result in rank order."""
    offset = 10

    def body(rank, world):
        total = torch.tensor([rank + offset])
        dist.all_reduce(total)
        return rank, int(total)

    assert launch.spawn(body, 3) == [(0, 33), (1, 33), (2, 33)]
