"""sptutor.launch.Pool: one launch runs many tasks; a task that raises, dies or hangs ends the pool
with spawn's diagnostics, and no child outlives the pool (closed, left, collected or at exit).

No test measures seconds (CI boxes are loaded). A fast path is proved by a message: every pool's
timeout is far above its start-up and the failures' own delays, so a report that names an error,
a death or a task timeout was made before the pool's timeout ran out.
"""

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from sptutor import comm, launch

WORLD = 4
TIMEOUT_S = 30  # a pool starts in ~5 s on a loaded two-core box
REDUCTIONS = {"sum": (dist.ReduceOp.SUM, sum), "max": (dist.ReduceOp.MAX, max)}


@pytest.fixture(scope="module")
def pool():
    with launch.Pool(WORLD, timeout=TIMEOUT_S) as shared:
        yield shared


def _assert_ended(pids: list[int]) -> None:
    """None of these processes exists any more (ended and reaped, not zombies)."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _all_reduce(rank, world, values, op):
    total = torch.tensor([values[rank]])
    dist.all_reduce(total, op=REDUCTIONS[op][0])
    return int(total)


def _pid(rank, world):
    return os.getpid()


@given(
    values=st.lists(st.integers(-(2**40), 2**40), min_size=WORLD, max_size=WORLD),
    op=st.sampled_from(sorted(REDUCTIONS)),
)
def test_many_tasks_in_one_pool_reduce_across_ranks(pool, values, op):
    """Each task all-reduces one int64 per rank: every rank gets the reduction of all four."""
    expected = REDUCTIONS[op][1](values)
    assert pool.run(_all_reduce, (values, op)) == [expected] * WORLD  # integers: exact


def test_tasks_run_on_the_same_ranks_and_ship_closures_by_value(pool):
    """A closure over test locals runs by value; every task runs on the processes in pool.pids."""
    offset = {"base": 10}

    def body(rank, world, scale):
        return rank * scale + offset["base"], world

    assert pool.run(body, (3,)) == [(r * 3 + 10, WORLD) for r in range(WORLD)]
    assert pool.run(_pid) == pool.pids == pool.run(_pid, timeout=5)
    assert pool.alive


def _timeout_s(group: dist.ProcessGroup) -> float:
    """The group's own timeout, as its gloo backend holds it."""
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_sub_groups_made_in_tasks_reduce_within_their_members(pool):
    """Two tasks each make the pair groups {0, 1}, {2, 3} (comm.new_group, collective over the
    world) and all-reduce in their own pair: each rank gets its pair's sum. The world group and
    the pairs time out after the pool's timeout, so peers of a stuck rank give up too."""

    def pair_sum(rank, world, offset):
        pairs = [comm.new_group([first, first + 1]) for first in range(0, world, 2)]
        total = torch.tensor([rank + offset])
        dist.all_reduce(total, group=pairs[rank // 2])
        return int(total), _timeout_s(dist.group.WORLD), _timeout_s(pairs[rank // 2])

    for offset in (0, 100):
        sums = [(2 * (r // 2 * 2) + 1 + 2 * offset) for r in range(WORLD)]  # (2p+o) + (2p+1+o)
        expected = [(total, TIMEOUT_S, TIMEOUT_S) for total in sums]
        assert pool.run(pair_sum, (offset,)) == expected  # integers: exact


def test_a_task_that_does_not_pickle_is_refused_and_the_pool_goes_on(pool):
    """A closure over a lock is refused before anything is sent (naming the lock and what to do),
    and the pool still runs the next task."""
    lock = threading.Lock()

    def body(rank, world):
        with lock:
            return rank

    with pytest.raises(TypeError, match=r"`lock`, a _thread.lock that (.*)body uses(.*)inside"):
        pool.run(body)
    assert pool.alive
    assert pool.run(_all_reduce, ([1] * WORLD, "sum")) == [WORLD] * WORLD


def test_a_task_that_raises_on_one_rank_ends_the_pool():
    """Rank 1 raises while ranks 0 and 2 wait for it in all_reduce: the SpawnError names rank 1
    with its traceback, every child is ended, and the pool refuses further tasks."""
    pool = launch.Pool(3, timeout=TIMEOUT_S)
    pids = pool.pids
    assert pool.run(_all_reduce, ([1, 2, 3], "sum")) == [6, 6, 6]  # it worked before

    def body(rank, world):
        if rank == 1:
            raise ValueError("rank 1 refuses this task")
        dist.all_reduce(torch.ones(1))

    pattern = r"^rank 1 of 3 failed(.|\n)*ValueError: rank 1 refuses this task"
    with pytest.raises(launch.SpawnError, match=pattern):
        pool.run(body)
    assert not pool.alive
    _assert_ended(pids)
    with pytest.raises(RuntimeError, match="after a failed task, so it runs no more tasks"):
        pool.run(_pid)


def test_a_task_past_its_timeout_names_the_rank_holding_the_others_up():
    """Rank 1 sleeps while ranks 0 and 2 wait in all_reduce: at the task's 3 s timeout (the
    pool's groups would wait 30 s) the SpawnError names rank 1 and where each rank was."""
    pool = launch.Pool(3, timeout=TIMEOUT_S)
    pids = pool.pids

    def body(rank, world):
        if rank == 1:
            time.sleep(3600)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(launch.SpawnError, match=r"^Pool.run timed out after 3 s") as raised:
        pool.run(body, timeout=3)
    message = str(raised.value)
    assert "Holding the others up (outside any collective they waited in): rank 1." in message
    assert "rank 0: waiting in torch.distributed (all_reduce)" in message
    assert "rank 1: in body at" in message  # time.sleep is C: body is its innermost frame
    assert not pool.alive
    _assert_ended(pids)


def test_a_rank_that_exits_ends_the_pool_with_its_exit_code():
    """Rank 2 calls os._exit(3) while the others wait in all_reduce: the SpawnError names it and
    its exit code (not a timeout), and every child is ended."""
    pool = launch.Pool(3, timeout=TIMEOUT_S)
    pids = pool.pids

    def body(rank, world):
        if rank == 2:
            os._exit(3)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(launch.SpawnError, match=r"^rank 2 of 3 died with exit code 3 before"):
        pool.run(body)
    assert not pool.alive
    _assert_ended(pids)


def test_children_end_on_a_parent_exception_and_on_garbage_collection():
    """Leaving a with block by an exception ends the children and later runs raise; so does
    dropping the last reference to a pool."""
    with pytest.raises(KeyError, match="the parent's own"), launch.Pool(2, TIMEOUT_S) as pool:
        pids = pool.pids
        assert pool.run(_pid) == pids
        raise KeyError("the parent's own error")
    assert not pool.alive
    _assert_ended(pids)
    with pytest.raises(RuntimeError, match="this Pool is closed, so it runs no more tasks"):
        pool.run(_pid)
    dropped = launch.Pool(1, TIMEOUT_S)  # one rank is enough, and starts fastest
    pids = dropped.pids
    del dropped
    gc.collect()
    _assert_ended(pids)


LEFT_OPEN_SCRIPT = """
from sptutor import launch


def rank(rank, world):
    return rank


if __name__ == "__main__":
    pool = launch.Pool(1, timeout=60)
    assert pool.run(rank) == [0]
    print(*pool.pids)  # never closed: the end of the program must end them
"""


def test_a_pool_left_open_is_ended_when_the_program_ends(tmp_path):
    """A script that never closes its pool still exits (multiprocessing would wait for the
    children forever) and leaves no child behind."""
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    _assert_ended([int(pid) for pid in done.stdout.split()])
