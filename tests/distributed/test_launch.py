"""sptutor.launch.spawn: closures run by value, and a failing rank ends the launch quickly with
its own message (DESIGN §8: never a hang)."""

import pytest
import torch
import torch.distributed as dist

import sptutor
from sptutor import launch


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
