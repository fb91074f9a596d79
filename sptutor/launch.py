"""``spawn``: run a function on W gloo processes from a script, a test or a notebook.

The function and its arguments travel to the children by value (cloudpickle), so a function
defined in a notebook cell or inside a test works. Rendezvous goes through a file, so no TCP port
is fixed or guessed.

The parent watches every child's pipe and process at once, so a failure never waits for the
timeout: a rank that raises, dies (an exit code, a signal) or dies while starting ends the launch
within seconds, named, with its traceback or exit status. A rank that hangs is found when the
timeout runs out; each running rank is then asked where it is (its stack, via faulthandler), which
shows the one the others wait for in a collective. Every child is ended before ``spawn`` returns.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist

from sptutor import comm

ERROR_GRACE_S = 2.0  # after a first failure, how long to wait for the ranks it made fail
STACK_WAIT_S = 2.0  # how long running ranks get to write their stacks when asked
STACK_SIGNAL = getattr(signal, "SIGUSR1", None)  # asks a running rank for its stack (POSIX only)
UNGUARDED_EXIT_CODE = 87  # a child found spawn called while it re-ran the main script
UNGUARDED_MESSAGE = (
    "spawn was called while its child processes were re-running the main script, which has no "
    '`if __name__ == "__main__":` guard: every child of the "spawn" start method imports the '
    "script again, so a call at its top level would start processes in each child. Put the spawn "
    'call (and whatever should run only once) under `if __name__ == "__main__":`.'
)
_FRAME = re.compile(r'File "(.+)", line (\d+) in (.+)')  # one line of a faulthandler stack
_TORCH = os.path.join(os.sep, "torch", "")  # a frame in torch, as a path piece
_TORCH_DISTRIBUTED = os.path.join(_TORCH, "distributed", "")


class SpawnError(RuntimeError):
    """A launch of :func:`spawn` failed; the message names the rank(s) to blame and why."""


@dataclass
class _Rank:
    """What the parent knows of one child: its process, its pipe, and what it has said."""

    process: multiprocessing.process.BaseProcess
    reader: Connection
    stack_path: str  # where the child writes its stack when asked
    started: bool = False  # it got through Python's start-up into _child
    answer: tuple[str, float, Any] | None = None  # (kind, time.time(), result | traceback | exit)


def _child(
    rank: int, world: int, payload: bytes, init_file: str, stack_path: str, conn: Connection,
    timeout_s: float,
) -> None:  # fmt: skip
    """Body of one child process: say it started, join the group, run the function, answer."""
    with open(stack_path, "w") as stack_file:
        if STACK_SIGNAL is not None:  # lets the parent ask where this rank is stuck
            faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True)
        conn.send(("started", time.time(), None))
        torch.set_num_threads(1)  # W processes share a few cores: no oversubscription
        try:
            fn, args = cloudpickle.loads(payload)
            comm.set_group_timeout(timedelta(seconds=timeout_s))  # sub-groups too (comm.new_group)
            dist.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )  # fmt: skip
            result = fn(rank, world, *args)
            conn.send(("ok", time.time(), pickle.dumps(result)))
        except BaseException as error:
            conn.send((_kind(error), time.time(), traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            conn.close()


def _kind(error: BaseException) -> str:
    """A RuntimeError raised inside torch.distributed (a timeout, a lost peer) is a "comm-error":
    usually a reaction to another rank's failure, not a cause. Anything else is an "error"."""
    frames = list(traceback.walk_tb(error.__traceback__))
    module = frames[-1][0].f_globals.get("__name__", "") if frames else ""
    inside = isinstance(error, RuntimeError) and module.startswith("torch.distributed")
    return "comm-error" if inside else "error"


def _end(processes: list) -> None:
    """Terminate every child still running, then kill the ones that ignore it."""
    processes = [process for process in processes if process.pid is not None]  # started ones
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 3
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def spawn(
    fn: Callable[..., Any], world: int, args: tuple = (), *, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo processes; return their results.

    ``results[r]`` is what rank r returned (it must pickle). Every process group, sub-groups from
    ``comm.new_group`` included, times out after ``timeout`` seconds too. Raises
    :class:`SpawnError` once every child is ended (terminate, then kill):

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
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.exit(UNGUARDED_EXIT_CODE)  # a child re-running an unguarded script: the parent explains
    if world < 1:
        raise ValueError(f"spawn needs world >= 1, got world={world}")
    context = multiprocessing.get_context("spawn")
    payload = cloudpickle.dumps((fn, args))
    with tempfile.TemporaryDirectory(prefix="sptutor-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ranks, writers = [], []
        for r in range(world):
            reader, writer = context.Pipe(duplex=False)
            stack_path = os.path.join(tmp, f"stack-{r}")
            child_args = (r, world, payload, init_file, stack_path, writer, timeout)
            ranks.append(_Rank(context.Process(target=_child, args=child_args), reader, stack_path))
            writers.append(writer)
        try:
            for rank, writer in zip(ranks, writers):
                rank.process.start()
                writer.close()  # the child's copy is now the only one: its death closes the pipe
            return _collect(ranks, timeout)
        finally:
            _end([rank.process for rank in ranks])


def _collect(ranks: list[_Rank], timeout: float) -> list[Any]:
    """Wait on every pipe and every process at once until all ranks answered; after a first
    failure, wait ERROR_GRACE_S more for the ranks it makes fail, then report."""
    give_up_at = time.monotonic() + timeout
    waiting = ranks
    while waiting and (left := give_up_at - time.monotonic()) > 0:
        ready = set(wait([r.reader for r in waiting] + [r.process.sentinel for r in waiting], left))
        for rank in waiting:
            if rank.reader in ready or rank.process.sentinel in ready:
                _read(rank)
        if any(rank.answer is not None and rank.answer[0] != "ok" for rank in ranks):
            give_up_at = min(give_up_at, time.monotonic() + ERROR_GRACE_S)
        waiting = [rank for rank in ranks if rank.answer is None]
    if waiting or any(rank.answer[0] != "ok" for rank in ranks):
        raise SpawnError(_report(ranks, timeout))
    return [rank.answer[2] for rank in ranks]


def _read(rank: _Rank) -> None:
    """Take in what the child sent; an ended process or a closed pipe without answer is a death."""
    try:
        while rank.answer is None and rank.reader.poll():
            kind, when, body = rank.reader.recv()
            rank.started = True
            if kind != "started":
                rank.answer = (kind, when, pickle.loads(body) if kind == "ok" else body)
    except EOFError:
        rank.process.join(5)  # the pipe closes as the child exits: let it finish
    if rank.answer is None and rank.process.exitcode is not None:
        rank.answer = ("died", time.time(), rank.process.exitcode)


def _report(ranks: list[_Rank], timeout: float) -> str:
    """Whom to blame: a missing guard, else the first rank that failed on its own (an error or a
    death), else the ranks that never answered; errors inside torch.distributed are reactions."""
    answers = {i: rank.answer for i, rank in enumerate(ranks) if rank.answer is not None}
    unguarded = ("died", UNGUARDED_EXIT_CODE)  # the code a bootstrapping child exits with
    if any((a[0], a[2]) == unguarded and not ranks[i].started for i, a in answers.items()):
        return UNGUARDED_MESSAGE
    failed = sorted(i for i, (kind, _, _) in answers.items() if kind != "ok")
    own = [i for i in failed if answers[i][0] != "comm-error"]
    running = [i for i, rank in enumerate(ranks) if rank.answer is None]
    if own or not running:
        cause = min(own or failed, key=lambda i: answers[i][1])
        return _failure(ranks, cause, failed, running)
    return _hang(ranks, running, failed, timeout)


def _failure(ranks: list[_Rank], cause: int, failed: list[int], running: list[int]) -> str:
    """'rank 2 of 4 failed (then rank 0 failed too):' and its traceback, or how it died."""
    kind, _, body = ranks[cause].answer
    others = [i for i in failed if i != cause]
    what = _death(body, ranks[cause].started) if kind == "died" else "failed"
    after = f" (then {_who(others)} failed too)" if others else ""
    ended = f"; {_who(running)} still running, now ended" if running else ""
    text = f"rank {cause} of {len(ranks)} {what}{after}{ended}"
    return text if kind == "died" else f"{text}:\n{body}"


def _death(exitcode: int | None, started: bool) -> str:
    """How a child ended without answering: 'was killed by signal 9 (SIGKILL) before answering'."""
    if exitcode is None:
        how = "closed its pipe"
    elif exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in set(signal.Signals) else "?"
        how = f"was killed by signal {-exitcode} ({name})"
    else:
        how = f"died with exit code {exitcode}"
    if started:
        return f"{how} before answering"
    return (
        f"{how} before it started running the function (while Python started the child, "
        "which re-imports the main script: its stderr says why)"
    )


def _hang(ranks: list[_Rank], running: list[int], failed: list[int], timeout: float) -> str:
    """Some ranks never answered: say which, where each one was, and which held the others up."""
    _ask_for_stacks([ranks[i] for i in running])
    where = {i: _where(ranks[i]) for i in running}
    stuck = [i for i in running if where[i][0] is False]
    answered = [i for i, rank in enumerate(ranks) if rank.answer and rank.answer[0] == "ok"]
    if failed:
        first = min(failed, key=lambda i: ranks[i].answer[1])
        head = (
            f"{_who(running)} of {len(ranks)} never answered, while {_who(failed)} failed in "
            "torch.distributed waiting (a timeout or a lost peer)"
        )
        tail = f"\nThe first error, from rank {first}:\n{ranks[first].answer[2]}"
    else:
        head = f"spawn timed out after {timeout:g} s: {_who(answered)} answered, "
        head += f"{_who(running)} still running"
        tail = ""
    text = f"{head}; every rank is now ended."
    if stuck and (failed or len(stuck) < len(running)):
        text += f"\nHolding the others up (outside any collective they waited in): {_who(stuck)}."
    lines = "".join(f"\n  rank {i}: {where[i][1]}" for i in running)
    return f"{text}\nWhere each running rank was:{lines}{tail}"


def _ask_for_stacks(running: list[_Rank]) -> None:
    """Signal each running rank to write its stack (faulthandler), and wait until they have."""
    asked = [rank for rank in running if rank.started and STACK_SIGNAL is not None]
    for rank in asked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank.process.pid, STACK_SIGNAL)
    sizes, deadline = None, time.monotonic() + STACK_WAIT_S
    while asked and time.monotonic() < deadline:
        time.sleep(0.1)
        previous, sizes = sizes, [os.path.getsize(rank.stack_path) for rank in asked]
        if all(sizes) and sizes == previous:
            return


def _where(rank: _Rank) -> tuple[bool | None, str]:
    """Where a running rank is, from its stack: (waiting in torch.distributed?, in words)."""
    if not rank.started:
        return None, "still starting (Python had not yet reached spawn's function)"
    with open(rank.stack_path) as stack_file:
        threads = [block for block in stack_file.read().split("\n\n") if block.strip()]
    frames = _FRAME.findall(threads[-1]) if threads else []  # the main thread is listed last
    if not frames:
        return None, "running (it wrote no stack)"
    file, line, function = frames[0]  # innermost call first
    if _TORCH_DISTRIBUTED not in file:
        return False, f"in {function} at {file}:{line}, not in a collective"
    caller = next((f for f in frames if _TORCH not in f[0]), frames[-1])
    return True, (
        f"waiting in torch.distributed ({function}), called from {caller[2]} at "
        f"{caller[0]}:{caller[1]}"
    )


def _who(ranks: list[int]) -> str:
    """'rank 1', 'ranks 0, 2, 3' or 'no rank'."""
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}" if ranks else "no rank"
