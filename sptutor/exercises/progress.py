"""Where each rank is: every blocking call of ``sptutor.comm`` reports its enter and leave here.

A learner's deadlock (a send without its receive, ranks in different collectives) hangs the
processes that know where they wait, and the ledger logs sends only; so each rank writes its state
as it goes to ``directory/progress-<rank>``, one small file replaced at once at every event::

    progress.report_to(directory)  # on each rank, before its first comm call
    ...
    print(progress.describe(progress.read(directory, world)))  # from anywhere, at any time
    # rank 0 waits to receive from rank 1 at forward step 3; rank 1 is in all_to_all at ...

``launch.Pool.run(..., progress=(directory, stall_seconds))`` makes its ranks report and ends a
task none of whose ranks made progress for ``stall_seconds`` (see :class:`Watch`); under torchrun,
where no parent watches, :func:`watchdog` ends a rank that waits that long in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from sptutor import comm

CHECK_S = 0.5  # how often the pool's parent and the watchdog look for progress
STALL_EXIT_CODE = 88  # a rank the watchdog ended: no progress for stall_seconds


@dataclass(frozen=True)
class State:
    """One rank's last event: ``event`` is "start" (reporting, no comm call yet), "enter" (waiting
    in ``op``), "leave" (computing after ``op``), "finish" (its task returned) or "absent" (it
    wrote nothing). ``count`` increases at every event; ``time`` is when it happened (time.time)."""

    rank: int
    count: int
    event: str
    time: float
    op: str | None = None  # "send", "recv", "all_to_all", "all_gather", "reduce_scatter", ...
    peer: int | None = None  # the global rank of a send's or a receive's other end
    phase: str = ""
    step: int = 0

    @property
    def waiting(self) -> bool:
        """Inside a blocking call."""
        return self.event == "enter"


class _Reporter:
    """The hook ``sptutor.comm`` calls: keeps this rank's state, and writes it (directory None:
    keeps it in memory only, for the watchdog)."""

    def __init__(self, directory: str | None, rank: int, count: int) -> None:
        self.directory, self.rank = directory, rank
        self.state = State(rank, count, "start", time.time())
        self._write()

    def __call__(self, event: str, op: str, peer: int | None, phase: str, step: int) -> None:
        self.state = State(
            self.rank, self.state.count + 1, event, time.time(), op, peer, phase, step
        )
        self._write()

    def finish(self) -> None:
        self.state = dataclasses.replace(self.state, count=self.state.count + 1, event="finish",
                                         time=time.time())  # fmt: skip
        self._write()

    def _write(self) -> None:
        """Replace the state file at once (write a temporary, rename it), so a reader never sees
        half of one."""
        if self.directory is None:
            return
        path = _path(self.directory, self.rank)
        with open(f"{path}.tmp", "w") as file:
            file.write(json.dumps(dataclasses.asdict(self.state)))
        os.replace(f"{path}.tmp", path)


_reporter: _Reporter | None = None  # this process's, while it reports


def report_to(directory: str | os.PathLike | None, rank: int | None = None) -> None:
    """From now on, this rank reports every blocking comm call to ``directory/progress-<rank>``
    (created if need be; None: in memory only, as :func:`watchdog` needs). ``rank`` defaults to
    this process's global rank. Its first state says it reports and has not communicated yet."""
    global _reporter
    rank = dist.get_rank() if rank is None else rank
    if directory is not None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
    count = _reporter.state.count if _reporter is not None else 0  # one count for the process
    _reporter = _Reporter(directory, rank, count)
    comm.set_progress_hook(_reporter)


def finish() -> None:
    """Report that this rank's task is done, then stop reporting (comm calls cost nothing again)."""
    if _reporter is not None:
        _reporter.finish()
    stop()


def stop() -> None:
    """Stop reporting, leaving the last state written where it was."""
    global _reporter
    _reporter = None
    comm.set_progress_hook(None)


@contextlib.contextmanager
def reporting(directory: str | os.PathLike | None, rank: int | None = None) -> Iterator[None]:
    """Report inside the ``with`` block; "finish" if it ends without an error, stop either way."""
    report_to(directory, rank)
    try:
        yield
        finish()
    finally:
        stop()


def read(directory: str | os.PathLike, world: int) -> list[State]:
    """Every rank's last state, in rank order ("absent" for a rank that wrote none)."""
    return [_read_one(os.fspath(directory), rank) for rank in range(world)]


def _read_one(directory: str, rank: int) -> State:
    try:
        with open(_path(directory, rank)) as file:
            return State(**json.loads(file.read()))
    except FileNotFoundError:
        return State(rank, 0, "absent", 0.0)


def _path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"progress-{rank}")


def describe(states: list[State]) -> str:
    """Where each rank is, in words: 'rank 0 waits to receive from rank 1 at forward step 3;
    rank 1 is in all_to_all at forward step 0; rank 2 finished'."""
    return "; ".join(f"rank {state.rank} {where(state)}" for state in states)


def where(state: State) -> str:
    """One rank's state in words, without its name: 'waits for its send to rank 2 at forward step
    1', 'is computing (last: all_gather at backward step 0)', 'finished'."""
    at = f" at {state.phase} step {state.step}" if state.phase else ""
    if state.event == "enter" and state.op in ("send", "recv"):
        waits = "waits for its send to" if state.op == "send" else "waits to receive from"
        return f"{waits} rank {state.peer}{at}"
    if state.event == "enter":
        return f"is in {state.op}{at}"
    if state.event == "leave":
        done = {"send": f"sent to rank {state.peer}", "recv": f"received from rank {state.peer}"}
        return f"is computing (last: {done.get(state.op, state.op)}{at})"
    return {
        "start": "is computing (no communication yet)",
        "finish": "finished",
        "absent": "has not reported (no progress file)",
    }[state.event]


def stalled(directory: str | os.PathLike, world: int, seconds: float) -> bool:
    """Has no rank's state changed for ``seconds``, while one of them waits in a blocking call?
    (Ranks that all compute are slow, not stuck: that is left to the launch's timeout.)"""
    states = [state for state in read(directory, world) if state.event != "absent"]
    if not any(state.waiting for state in states):
        return False
    return time.time() - max(state.time for state in states) >= seconds


@dataclass
class Watch:
    """A Pool task's progress, for ``Pool.run(..., progress=(directory, seconds))``: :meth:`task`
    makes each rank report to ``directory``; calling the watch asks the files whether the ranks
    stalled (it stays True once it was: ``fired``). The task's files replace earlier ones."""

    world: int
    directory: str | os.PathLike
    seconds: float
    fired: bool = False

    def __post_init__(self) -> None:
        self.directory = os.fspath(self.directory)
        for rank in range(self.world):  # an earlier task's states would look like a stall
            with contextlib.suppress(FileNotFoundError):
                os.remove(_path(self.directory, rank))

    def task(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(rank, world, *args)``, run with this rank reporting (picklable)."""
        return functools.partial(_run_reporting, self.directory, fn)

    def __call__(self) -> bool:
        self.fired = self.fired or stalled(self.directory, self.world, self.seconds)
        return self.fired

    def describe(self) -> str:
        """Where each rank is now (:func:`describe`)."""
        return describe(read(self.directory, self.world))


def _run_reporting(directory: str, fn: Callable[..., Any], rank: int, world: int, *args) -> Any:
    with reporting(directory, rank):
        return fn(rank, world, *args)


def watchdog(stall_seconds: float) -> threading.Thread:
    """Under torchrun (no parent watching): a daemon thread that ends this process, with
    STALL_EXIT_CODE and 'rank R: no progress for N s: <where it waits>' on stderr, once it has
    waited ``stall_seconds`` in one blocking comm call, so that torchrun ends the job. Starts
    reporting in memory if this rank does not report yet (:func:`report_to`).

    A deadlock involves several ranks, and torchrun ends the others (SIGTERM) as soon as one
    watchdog fires, before theirs could; so, called from the main thread, it also makes a rank
    that SIGTERM ends while it waits say 'rank R: ended by SIGTERM: <where it waits>'. A Python
    signal handler would never run (the main thread is blocked inside the C call), so the signal
    wakes this thread through ``signal.set_wakeup_fd`` instead."""
    if _reporter is None:
        report_to(None)
    wake = _wake_on_termination()
    thread = threading.Thread(target=_watch, args=(stall_seconds, wake), daemon=True,
                              name="sptutor-progress-watchdog")  # fmt: skip
    thread.start()
    return thread


def _wake_on_termination() -> int | None:
    """The read end of a pipe that SIGTERM writes its number to, or None off the main thread
    (only it may install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    read, write = os.pipe()
    os.set_blocking(write, False)
    # the handler ends the process if the main thread gets to run it (it was not waiting)
    signal.signal(signal.SIGTERM, lambda number, frame: os._exit(128 + number))
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    return read


def _watch(stall_seconds: float, wake: int | None) -> None:
    while True:
        terminated = _sleep(wake)
        reporter = _reporter  # once: the main thread may stop reporting meanwhile
        state = reporter.state if reporter is not None else None
        waiting = state is not None and state.waiting
        if terminated:
            if waiting:
                print(f"rank {state.rank}: ended by SIGTERM: {where(state)}", file=sys.stderr,
                      flush=True)  # fmt: skip
            os._exit(128 + signal.SIGTERM)
        if waiting and time.time() - state.time >= stall_seconds:
            message = f"rank {state.rank}: no progress for {stall_seconds:g} s: {where(state)}"
            print(message, file=sys.stderr, flush=True)
            os._exit(STALL_EXIT_CODE)


def _sleep(wake: int | None) -> bool:
    """Sleep CHECK_S, or less if SIGTERM arrives on ``wake``: whether it did."""
    if wake is None:
        time.sleep(CHECK_S)
        return False
    if not select.select([wake], [], [], CHECK_S)[0]:
        return False
    return int(signal.SIGTERM) in os.read(wake, 64)
