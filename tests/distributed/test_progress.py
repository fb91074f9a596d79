"""sptutor.exercises.progress: every blocking comm call reports its enter and leave; a Pool task
whose ranks stop making progress ends within seconds of the stall, saying in words where each rank
waits; steady progress is never taken for a stall; under torchrun the watchdog ends a stuck rank.

A stall is proved by its message ("stalled", not "timed out"): every pool's timeout is far above
the stall seconds, so a report that says "stalled" was made long before the timeout ran out.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sptutor import comm, launch
from sptutor.exercises import progress
from sptutor.exercises.progress import State

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60  # the pools' and their groups' timeout: far above every stall below
STALL_S = 3


def test_describe_says_where_each_rank_is_in_words():
    """Each kind of state reads as the grader's sentence, ranks in order, joined by '; '."""
    states = [
        State(0, 5, "enter", 0.0, "recv", 1, "forward", 3),
        State(1, 2, "enter", 0.0, "send", 2, "backward", 1),
        State(2, 7, "enter", 0.0, "all_to_all", None, "forward", 0),
        State(3, 4, "leave", 0.0, "all_gather", None, "backward", 2),
        State(4, 4, "leave", 0.0, "recv", 3, "forward", 1),
        State(5, 0, "start", 0.0),
        State(6, 9, "finish", 0.0, "all_reduce", None, "forward", 0),
        State(7, 0, "absent", 0.0),
        State(8, 1, "enter", 0.0, "recv", 7),  # a receive without phase: no "at ..."
    ]
    assert progress.describe(states) == (
        "rank 0 waits to receive from rank 1 at forward step 3; "
        "rank 1 waits for its send to rank 2 at backward step 1; "
        "rank 2 is in all_to_all at forward step 0; "
        "rank 3 is computing (last: all_gather at backward step 2); "
        "rank 4 is computing (last: received from rank 3 at forward step 1); "
        "rank 5 is computing (no communication yet); "
        "rank 6 finished; "
        "rank 7 has not reported (no progress file); "
        "rank 8 waits to receive from rank 7"
    )


def _stuck(rank, world):
    """Ranks 0 and 1 each wait to receive from the other first; rank 2 all-reduces with rank 0
    and rank 3 all-gathers with rank 1 (pairs of their own: they never meet), so all wait."""
    pairs = {2: comm.new_group([0, 2]), 3: comm.new_group([1, 3])}
    x = torch.ones(2)
    if rank < 2:
        comm.recv(x, 1 - rank, None, phase="forward", step=3 if rank == 0 else 0)
    elif rank == 2:
        comm.all_reduce(x, pairs[2], phase="forward", step=0)
    else:
        comm.all_gather(x, pairs[3], phase="backward", step=1)


def test_a_stalled_task_ends_soon_and_says_where_each_rank_waits(tmp_path):
    """A deadlock (0 and 1 receive from each other) with ranks in different collectives (2 in
    all_reduce, 3 in all_gather): the SpawnError opens with where each one waits, comes a few
    seconds after the stall (not at the 60 s timeout), and every child is gone."""
    pool = launch.Pool(4, timeout=TIMEOUT_S)
    pids = pool.pids
    started = time.monotonic()
    with pytest.raises(launch.SpawnError) as raised:
        pool.run(_stuck, progress=(tmp_path, STALL_S))
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert message.startswith(
        "rank 0 waits to receive from rank 1 at forward step 3; "
        "rank 1 waits to receive from rank 0 at forward step 0; "
        "rank 2 is in all_reduce at forward step 0; "
        "rank 3 is in all_gather at backward step 1\n"
        f"Pool.run stalled: no rank made progress for {STALL_S} s"
    ), message
    assert "Where each running rank was:" in message  # spawn's stack diagnosis follows
    assert elapsed < TIMEOUT_S / 3, elapsed  # stall + checks + stacks + ending: ~6 s when idle
    assert not pool.alive
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def pool():
    with launch.Pool(2, timeout=TIMEOUT_S) as shared:
        yield shared


def _steady(rank, world, rounds):
    """Rank 0 computes 0.4 s before each all_reduce while rank 1 waits in it: progress, slowly."""
    totals = []
    for step in range(rounds):
        if rank == 0:
            time.sleep(0.4)
        total = comm.all_reduce(torch.tensor([rank + step]), None, phase="forward", step=step)
        totals.append(int(total))
    return totals, comm._progress_hook is None


def test_steady_progress_is_not_a_stall_and_nothing_reports_without_progress(pool, tmp_path):
    """Eight all-reduces, 3.2 s in all, under a 1.5 s stall limit: the task completes, each
    rank's last state is 'finish'. Its hook is gone afterwards: a task without progress leaves
    the files as they were, and no rank has a hook (comm calls cost one `if`)."""
    rounds, stall_s = 8, 1.5
    results = pool.run(_steady, (rounds,), progress=(tmp_path, stall_s))
    sums = [2 * step + 1 for step in range(rounds)]  # (0 + step) + (1 + step), integers: exact
    assert results == [(sums, False)] * 2  # the hook was installed while the task ran
    states = progress.read(tmp_path, 2)
    assert [state.event for state in states] == ["finish", "finish"]
    files = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    assert sorted(path.name for path in files) == ["progress-0", "progress-1"]
    assert pool.run(_steady, (2,)) == [([1, 3], True)] * 2
    assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == files
    assert not progress.stalled(tmp_path, 2, 0)  # finished ranks wait for nothing


def _events(rank, world):
    """Every blocking call of sptutor.comm once, with a hook that keeps what it hears."""
    heard = []
    comm.set_progress_hook(lambda *event: heard.append(event))
    try:
        x = torch.ones(2)
        comm.ring_shift([x], None, phase="forward", step=1).wait()
        if rank == 0:
            comm.send(x, 1, None, phase="backward", step=2)
        else:
            comm.recv(x, 0, None, phase="backward", step=2)
        comm.all_to_all([x, x], None, phase="forward", step=3)
        comm.all_gather(x, None, phase="forward", step=4)
        comm.reduce_scatter([x, x], None, phase="backward", step=5)
        comm.all_reduce(x, None, phase="backward", step=6)
    finally:
        comm.set_progress_hook(None)
    return heard


def test_every_blocking_call_reports_enter_then_leave(pool):
    """Each rank hears (enter, leave) for each wait of a ring shift (its send to the next rank,
    its receive from the previous), a send or receive, and each collective, with global peers."""
    for rank, heard in enumerate(pool.run(_events)):
        other = 1 - rank
        p2p = ("send", other) if rank == 0 else ("recv", other)
        calls = [
            ("send", other, "forward", 1),
            ("recv", other, "forward", 1),
            (*p2p, "backward", 2),
            ("all_to_all", None, "forward", 3),
            ("all_gather", None, "forward", 4),
            ("reduce_scatter", None, "backward", 5),
            ("all_reduce", None, "backward", 6),
        ]
        assert heard == [(event, *call) for call in calls for event in ("enter", "leave")]


WATCHDOG_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from sptutor import comm
    from sptutor.exercises import progress

    if __name__ == "__main__":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        progress.watchdog(3 if rank == 0 else 60)  # rank 0's fires; torchrun then ends 1 and 2
        peer = {0: 1, 1: 2, 2: 1}[rank]  # 1 and 2 wait for each other: gloo sees no lost peer
        comm.recv(torch.zeros(2), peer, None, phase="forward", step=rank)
    """
)


def test_under_torchrun_the_watchdog_ends_ranks_that_wait_for_each_other(tmp_path):
    """Three torchrun ranks wait to receive (0 from 1, 1 from 2, 2 from 1): within 30 s rank 0's
    watchdog says where it waits and exits, torchrun fails the job and ends ranks 1 and 2 with
    SIGTERM, and each says where it waited too, long before its own watchdog (60 s) would fire.
    (Without that, whichever watchdog fired first decided which ranks were heard: a race.)"""
    script = tmp_path / "deadlock.py"
    script.write_text(WATCHDOG_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "3", str(script)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    ended = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    assert ended.returncode != 0
    assert elapsed < 30, elapsed
    said = ended.stderr
    assert "rank 0: no progress for 3 s: waits to receive from rank 1 at forward step 0" in said
    assert "rank 1: ended by SIGTERM: waits to receive from rank 2 at forward step 1" in said
    assert "rank 2: ended by SIGTERM: waits to receive from rank 1 at forward step 2" in said
