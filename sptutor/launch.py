"""``spawn`` and ``Pool``: run functions on W gloo processes from a script, a test or a notebook.

``spawn(fn, world)`` starts W processes, runs ``fn(rank, world)`` once on each and ends them;
``Pool(world)`` starts them once (one ``init_process_group``) and runs task after task::

    with launch.Pool(world=4, timeout=30.0) as pool:
        results = pool.run(fn, args=(...))  # fn(rank, world, *args) on every rank, in rank order

A function and its arguments travel by value (cloudpickle), so one defined in a notebook cell or
a test works; the modules it uses go by name. Rendezvous goes through a file: no TCP port.

The parent watches every child's pipe and process at once, so a rank that raises, dies (an exit
code, a signal) or dies while starting ends the launch within seconds, named, with its traceback
or exit status. A rank that hangs is found at the timeout: each running rank is asked for its
stack (faulthandler), which shows the one the others wait for in a collective (the reports are
``sptutor.postmortem``'s). A failed task ends its whole pool: ranks stopped at different
collectives cannot be brought back in step.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import io
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.util import Finalize
from typing import Any

import torch
import torch.distributed as dist

from sptutor import comm, postmortem
from sptutor.postmortem import STACK_SIGNAL, UNGUARDED_EXIT_CODE, Child

ERROR_GRACE_S = 2.0  # after a first failure, how long to wait for the ranks it made fail


class SpawnError(RuntimeError):
    """A launch (``spawn``, a ``Pool``, a task) failed; the message names whom to blame, and why."""


def _dumps(obj: Any) -> bytes:
    """cloudpickle.dumps, plus importable modules of a ModuleType subclass (``torch.backends``)
    by name: cloudpickle does that for exact ModuleTypes only (left to it:
    register_pickle_by_value). cloudpickle is imported here, on first use, so that the rest of
    sptutor (the methods, torchrun's entry points) imports without it."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            subclass = isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType
            if subclass and sys.modules.get(obj.__name__) is obj:
                return importlib.import_module, (obj.__name__,)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _task_payload(fn: Callable[..., Any], args: tuple, what: str, watch: Any = None) -> bytes:
    """``(fn, args)`` pickled for the ranks (``watch`` wraps fn); a TypeError names what won't."""
    try:
        return _dumps((watch.task(fn) if watch else fn, args))
    except Exception as error:
        raise TypeError(postmortem.cannot_send(fn, args, error, what, _dumps)) from error


def _child(
    rank: int, world: int, init_file: str, stack_path: str, conn: Connection, timeout_s: float
) -> None:
    """Body of one child process: say it started, join the group and say so, then run each task
    sent until the parent closes the pipe (or is gone), or a task fails."""
    with open(stack_path, "w") as stack_file:
        if STACK_SIGNAL is not None:  # lets the parent ask where this rank is stuck
            faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True)
        # a fatal signal (gloo aborts on a message of the wrong size) writes where it struck
        faulthandler.enable(file=stack_file, all_threads=True)
        conn.send(("started", time.time(), None))
        torch.set_num_threads(1)  # W processes share a few cores: no oversubscription
        try:
            comm.set_group_timeout(timedelta(seconds=timeout_s))  # sub-groups too (comm.new_group)
            dist.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )  # fmt: skip
            _answer(conn, "ok", pickle.dumps(None))  # in the group: ready for tasks
            while True:
                try:
                    fn, args = pickle.loads(conn.recv_bytes())  # cloudpickle output is pickle
                except EOFError:  # the parent closed its end of the pipe (or died): no more tasks
                    break
                _answer(conn, "ok", pickle.dumps(fn(rank, world, *args)))
        except BaseException as error:
            with contextlib.suppress(OSError):  # the parent may be gone
                _answer(conn, postmortem.kind_of(error), traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            conn.close()


def _answer(conn: Connection, kind: str, body: Any) -> None:
    """Send this round's answer, after what the task printed (so it shows before the report)."""
    for stream in filter(None, (sys.stdout, sys.stderr)):
        stream.flush()
    conn.send((kind, time.time(), body))


def _check_launch(world: int, what: str) -> None:
    """Refuse a launch from a child re-running an unguarded script, or of fewer than one rank."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.exit(UNGUARDED_EXIT_CODE)  # a child re-running an unguarded script: the parent explains
    if world < 1:
        raise ValueError(f"{what} needs world >= 1, got world={world}")


class _Children:
    """The W child processes of one launch, their pipes and their scratch folder. Starting them
    does not wait; each :meth:`round` (the start-up, then one per task) collects every answer."""

    def __init__(self, world: int, timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.created = time.monotonic()
        self.scratch = tempfile.TemporaryDirectory(prefix="sptutor-")
        init_file = os.path.join(self.scratch.name, "rendezvous")
        self.ranks: list[Child] = []
        try:
            for r in range(world):
                parent_end, child_end = context.Pipe()
                stack_path = os.path.join(self.scratch.name, f"stack-{r}")
                child_args = (r, world, init_file, stack_path, child_end, timeout)
                process = context.Process(target=_child, args=child_args)
                self.ranks.append(Child(process, parent_end, stack_path))
                process.start()
                child_end.close()  # the child's copy is now the only one: its death closes the pipe
        except BaseException:
            self.end()
            raise

    def round(
        self, payload: bytes | None, timeout: float, since: float, what: str, watch: Any = None
    ) -> list[Any]:
        """Send ``payload`` (a pickled task; None: wait for the start-up) to every rank and return
        their answers, or raise :class:`SpawnError` if they are not all in ``since + timeout``
        or ``watch`` (a ``progress.Watch``) says they stalled."""
        for rank in self.ranks:
            rank.answer = None
            if payload is not None:
                with contextlib.suppress(OSError):  # a dead child: its sentinel says so below
                    rank.conn.send_bytes(payload)
        _collect(self.ranks, since + timeout, watch)
        if any(rank.answer is None or rank.answer[0] != "ok" for rank in self.ranks):
            raise SpawnError(postmortem.report(self.ranks, timeout, what, watch))
        return [rank.answer[2] for rank in self.ranks]

    def end(self) -> None:
        """Terminate every child still running (what a task printed is flushed by then), kill
        the ones that ignore it, reap them all; close the pipes and drop the scratch folder."""
        processes = [rank.process for rank in self.ranks if rank.process.pid is not None]
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 3
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()  # reaped: no zombie keeps its pid
        for rank in self.ranks:
            rank.conn.close()
        self.scratch.cleanup()


def _collect(ranks: list[Child], give_up_at: float, stalled: Callable[[], bool] | None) -> None:
    """Wait on every pipe and process at once until all ranks answered, ``give_up_at`` (monotonic)
    or ``stalled()``; after a first failure, wait ERROR_GRACE_S more for the ranks it makes fail."""
    waiting = ranks
    while waiting and (left := give_up_at - time.monotonic()) > 0 and not (stalled and stalled()):
        left = min(left, postmortem.STALL_CHECK_S)  # wake up to ask stalled() again
        ready = set(wait([r.conn for r in waiting] + [r.process.sentinel for r in waiting], left))
        for rank in waiting:
            if rank.conn in ready or rank.process.sentinel in ready:
                rank.read()
        if any(rank.answer is not None and rank.answer[0] != "ok" for rank in ranks):
            give_up_at = min(give_up_at, time.monotonic() + ERROR_GRACE_S)
        waiting = [rank for rank in ranks if rank.answer is None]


def spawn(
    fn: Callable[..., Any], world: int, args: tuple = (), *, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo processes; return their results.

    ``results[r]`` is what rank r returned (it must pickle). ``timeout`` covers start-up and run,
    and is every process group's own (``comm.new_group``'s too). Raises TypeError before any
    process starts if ``fn`` or ``args`` cannot be pickled (naming the variable or argument that
    would not), and :class:`SpawnError` once every child is ended (terminate, then kill):

    - within seconds when a rank raises (its traceback), dies (its exit code or signal), or dies
      while Python starts it, before it runs ``fn``;
    - within seconds when ``spawn`` is called at the top level of a script that lacks
      ``if __name__ == "__main__":`` (each child re-runs the script; the message says so);
    - when ``timeout`` seconds pass, or when the other ranks fail in ``torch.distributed``
      (a timeout, a lost peer), while a rank never answers: the message names the ranks that
      answered and those still running, and says where each running rank was, so that the one
      outside any collective, the one the others wait for, stands out.

    Of several failures, the first rank that raised an error of its own or died is blamed: an
    error raised inside ``torch.distributed`` is a reaction to another rank, not a cause.
    """
    _check_launch(world, "spawn")
    payload = _task_payload(fn, args, "spawn")
    children = _Children(world, timeout)
    try:
        children.round(None, timeout, children.created, "spawn")
        return children.round(payload, timeout, children.created, "spawn")
    finally:
        children.end()


class Pool:
    """``world`` gloo processes started once, which run task after task (see :meth:`run`).

    Returns once every rank joined the process group, or raises :class:`SpawnError` as
    :func:`spawn` does. ``timeout`` is every group's own (``comm.new_group``'s too), so peers
    blocked in a collective give up too. Ranks keep their module state between tasks. A failed
    task ends every child (``alive`` is then False); so do :meth:`close`, leaving a ``with``
    block, garbage collection and the end of the program."""

    def __init__(self, world: int, timeout: float = 300.0) -> None:
        _check_launch(world, "Pool")
        self.world, self.timeout = world, timeout
        self._children = _Children(world, timeout)
        # ends the children on garbage collection, and at exit before multiprocessing joins them
        self._finalizer = Finalize(self, self._children.end, exitpriority=10)
        self._ended = ""  # why it takes no more tasks, "" while it does
        try:
            self._children.round(None, timeout, self._children.created, "Pool")
        except BaseException:
            self._end("could not start")
            raise

    @property
    def alive(self) -> bool:
        """True while the pool takes tasks: not closed, and no task of it failed."""
        return not self._ended

    @property
    def pids(self) -> list[int]:
        """The process id of each rank's child, in rank order (they stay valid until it ends)."""
        return [rank.process.pid for rank in self._children.ranks]

    def run(self, fn: Callable[..., Any], args: tuple = (), *, timeout: float | None = None,
            progress: tuple[str | os.PathLike, float] | None = None) -> list[Any]:  # fmt: skip
        """Run ``fn(rank, world, *args)`` on every rank; ``results[r]`` is what rank r returned.

        ``fn`` and ``args`` travel by value (cloudpickle); results must pickle. ``timeout``
        (default: the pool's) bounds this task. ``progress=(directory, stall_seconds)``: ranks
        report their comm calls there (``sptutor.exercises.progress``); none changing for
        stall_seconds while one waits ends the task as a timeout, saying where each rank is.
        Raises TypeError, sending nothing, if ``fn`` or ``args`` cannot be pickled; SpawnError
        with spawn's diagnostics when a rank raises, dies or does not answer in time (every
        child is then ended, ``alive`` is False); RuntimeError once the pool has ended."""
        if self._ended:
            raise RuntimeError(f"this Pool {self._ended}, so it runs no more tasks: make a new one")
        watch = postmortem.progress_watch(self.world, progress)
        payload = _task_payload(fn, args, "Pool.run", watch)
        timeout = self.timeout if timeout is None else timeout
        try:
            return self._children.round(payload, timeout, time.monotonic(), "Pool.run", watch)
        except BaseException:  # the ranks may be out of step in their collectives: end them all
            self._end("ended its ranks after a failed task")
            raise

    def close(self) -> None:
        """End every child (terminate, then kill); later tasks raise RuntimeError."""
        self._end("is closed")

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _end(self, reason: str) -> None:
        self._ended = self._ended or reason
        self._finalizer()  # ends the children, once
