"""sptutor.launch.spawn: closures run by value, and a rank that raises, dies, hangs or never
starts ends the launch with a message that names it; no child outlives the launch.

No test measures seconds (CI boxes are loaded). A fast path is proved by a message: each launch
gets a timeout far above its start-up, so a report that names a death or an error, not a timeout,
was made before the timeout ran out.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sptutor
from sptutor import launch

TIMEOUT_S = 20  # a launch starts in ~5 s on a loaded two-core box


def _write_pid(folder: Path, rank: int) -> None:
    (folder / f"{rank}.pid").write_text(str(os.getpid()))


def _assert_all_ended(folder: Path, world: int) -> None:
    """Every rank wrote its pid, and none of those processes exists any more."""
    pids = [int(path.read_text()) for path in folder.glob("*.pid")]
    assert len(pids) == world
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_failing_rank_ends_the_launch_with_its_message():
    """Rank 2 fails its layout check while the others wait for it: spawn reports rank 2."""

    def body(rank, world):
        q = torch.randn(1, 4, 1, 4)
        sptutor.ring_attention(q, q, q, layout="diagonal" if rank == 2 else "contiguous")

    with pytest.raises(launch.SpawnError, match=r"rank 2 of 4 failed(.|\n)*layout must be one of"):
        launch.spawn(body, 4, timeout=TIMEOUT_S)


def test_a_function_defined_in_a_test_runs_under_spawn():
    """spawn ships closures by value and returns each rank's result in rank order."""
    offset = 10

    def body(rank, world):
        total = torch.tensor([rank + offset])
        dist.all_reduce(total)
        return rank, int(total)

    assert launch.spawn(body, 3) == [(0, 33), (1, 33), (2, 33)]


def test_a_rank_that_exits_is_reported_with_its_exit_code(tmp_path):
    """Rank 1 calls os._exit(3) while the others wait for it in all_reduce: spawn names rank 1 and
    its exit code (not a timeout, nor the others' lost connection) and ends every rank."""

    def body(rank, world):
        _write_pid(tmp_path, rank)
        if rank == 1:
            os._exit(3)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(launch.SpawnError, match=r"^rank 1 of 3 died with exit code 3 before"):
        launch.spawn(body, 3, timeout=TIMEOUT_S)
    _assert_all_ended(tmp_path, 3)


def test_a_rank_killed_by_a_signal_is_reported_with_the_signal(tmp_path):
    """Rank 2 SIGKILLs itself while the others wait in all_reduce: spawn names it and the signal."""

    def body(rank, world):
        _write_pid(tmp_path, rank)
        if rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(torch.ones(1))

    with pytest.raises(launch.SpawnError, match=r"^rank 2 of 3 was killed by signal 9 \(SIGKILL\)"):
        launch.spawn(body, 3, timeout=TIMEOUT_S)
    _assert_all_ended(tmp_path, 3)


def test_a_rank_gloo_aborts_on_a_wrong_size_is_reported_where_it_waited(tmp_path):
    """Rank 1 receives 5 floats into a buffer of 3: gloo aborts it (SIGABRT); the report says
    where (the task's line, from the stack faulthandler wrote as it died) and what gloo aborts
    on. A SIGKILL writes no stack, so the report above says nothing of where."""

    def body(rank, world):
        _write_pid(tmp_path, rank)
        if rank == 0:
            dist.send(torch.ones(5), dst=1)
        else:
            dist.recv(torch.empty(3), src=0)  # the line the report names

    with pytest.raises(launch.SpawnError) as raised:
        launch.spawn(body, 2, timeout=TIMEOUT_S)
    message = str(raised.value)
    assert message.startswith("rank 1 of 2 was killed by signal 6 (SIGABRT) before answering, "
                              "in body at "), message  # fmt: skip
    line = body.__code__.co_firstlineno + 5
    assert f":{line} (SIGABRT: gloo, for one, aborts a rank that receives a message" in message
    _assert_all_ended(tmp_path, 2)


def test_at_the_timeout_the_rank_outside_the_collective_is_named(tmp_path):
    """Rank 1 sleeps while ranks 0 and 2 wait in a barrier: when the timeout runs out, spawn names
    rank 1 as the one holding them up, says where each rank was, and ends every rank."""

    def body(rank, world):
        _write_pid(tmp_path, rank)
        if rank == 1:
            time.sleep(3600)
        dist.barrier()

    with pytest.raises(launch.SpawnError, match=r"^spawn timed out after 10 s") as raised:
        launch.spawn(body, 3, timeout=10)
    assert "Holding the others up (outside any collective they waited in): rank 1." in str(
        raised.value
    )
    assert "rank 0: waiting in torch.distributed (barrier)" in str(raised.value)
    _assert_all_ended(tmp_path, 3)


def test_a_hung_rank_is_blamed_when_its_peers_time_out_first(tmp_path):
    """Rank 1 sleeps while the others' all_reduce on a 2 s group times out: spawn blames rank 1,
    which never answered, not the ranks whose collective timed out waiting for it."""

    def body(rank, world):
        _write_pid(tmp_path, rank)
        quick = dist.new_group(list(range(world)), timeout=timedelta(seconds=2))
        if rank == 1:
            time.sleep(3600)
        dist.all_reduce(torch.ones(1), group=quick)

    with pytest.raises(launch.SpawnError, match=r"^(.|\n)*never answered") as raised:
        launch.spawn(body, 3, timeout=60)
    assert "Holding the others up (outside any collective they waited in): rank 1." in str(
        raised.value
    )
    assert "The first error, from rank" in str(raised.value)
    _assert_all_ended(tmp_path, 3)


UNGUARDED_SCRIPT = """
import os

from sptutor import launch

if __name__ == "__mp_main__" and os.environ.get("DIE_WHILE_STARTING"):
    os._exit(5)  # every child re-runs this script first: these die before spawn's function


def body(rank, world):
    return rank


os.environ["DIE_WHILE_STARTING"] = "1"
try:
    launch.spawn(body, 2)
except launch.SpawnError as error:
    print(error)
del os.environ["DIE_WHILE_STARTING"]
launch.spawn(body, 2)  # at the top level, no __main__ guard: each child calls it again
"""


def test_children_that_die_while_starting_and_a_missing_main_guard_are_explained(tmp_path):
    """A script whose children die while re-running it gets their exit code; a spawn call at its
    top level (no ``if __name__ == "__main__":``) gets one sentence naming the guard, not each
    child's traceback, well within a budget shorter than spawn's 300 s default timeout."""
    script = tmp_path / "check.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert "of 2 died with exit code 5 before it started running the function" in done.stdout
    assert done.returncode != 0
    assert 'under `if __name__ == "__main__":`' in done.stderr
    assert "bootstrapping phase" not in done.stderr  # Python's own error, once per child


BACKENDS_SCRIPT = """
from torch import backends
from torch.backends import cudnn

import sptutor.backends
from sptutor import launch


def body(rank, world):
    return rank, type(backends).__name__, type(cudnn).__name__, sptutor.backends.__name__


if __name__ == "__main__":
    print(launch.spawn(body, 2))
"""


def test_a_script_using_torch_backends_runs_under_spawn(tmp_path):
    """torch.backends and torch.backends.cudnn are instances of ModuleType subclasses, which
    cloudpickle alone cannot pickle: spawn ships a __main__ function using them by name."""
    script = tmp_path / "backends_user.py"
    script.write_text(BACKENDS_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    names = "'GenericModule', 'CudnnModule', 'sptutor.backends'"
    assert done.stdout.strip() == f"[(0, {names}), (1, {names})]"


_LOCK = threading.Lock()


def test_a_global_that_does_not_pickle_is_named_before_any_process_starts():
    """A function using a module-level lock cannot travel: the TypeError names the global and
    says to import or create it inside the function, and no child was started."""

    def body(rank, world):
        with _LOCK:
            return rank

    pattern = r"^spawn cannot send (.*)body to its ranks: `_LOCK`, a _thread.lock that (.*)body "
    with pytest.raises(TypeError, match=pattern + r"uses, cannot be pickled(.*)create it inside"):
        launch.spawn(body, 2)
    assert multiprocessing.active_children() == []
