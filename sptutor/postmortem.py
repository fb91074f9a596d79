"""After a failed launch: whom to blame, and where each rank was.

``sptutor.launch`` keeps one :class:`Child` record per rank, which reads the rank's answers; when
a round (start-up or one task) fails, :func:`report` turns those records into the message of the
``SpawnError``. The first rank that raised an error of its own or died is blamed; an error raised
inside ``torch.distributed`` (a timeout, a lost peer) is a reaction to another rank, not a cause.
A rank that never answered is asked for its stack (faulthandler, on ``STACK_SIGNAL``), which shows
the one the others wait for in a collective. A function that cannot be sent to the ranks is
explained by :func:`cannot_send`: which of its variables (or arguments) does not pickle. A task
run with ``progress`` that stalls is reported as a hang, opening with where each rank waits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import re
import signal
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

STACK_WAIT_S = 2.0  # how long running ranks get to write their stacks when asked
STALL_CHECK_S = 0.5  # how often the parent asks a task's progress whether its ranks stalled
STACK_SIGNAL = getattr(signal, "SIGUSR1", None)  # asks a running rank for its stack (POSIX only)
UNGUARDED_EXIT_CODE = 87  # a child found a launch started while it re-ran the main script
_FRAME = re.compile(r'File "(.+)", line (\d+) in (.+)')  # one line of a faulthandler stack
_TORCH = os.path.join(os.sep, "torch", "")  # a frame in torch, as a path piece
_TORCH_DISTRIBUTED = os.path.join(_TORCH, "distributed", "")
_COMM = os.path.join("sptutor", "comm.py")


def unguarded_message(what: str) -> str:
    """Why the children of a script without a ``__main__`` guard died, for ``what`` = 'spawn'."""
    return (
        f"{what} was called while its child processes were re-running the main script, which has "
        'no `if __name__ == "__main__":` guard: every child of the "spawn" start method imports '
        "the script again, so a call at its top level would start processes in each child. Put "
        f'the {what} call (and whatever should run only once) under `if __name__ == "__main__":`.'
    )


@dataclass
class Child:
    """What the parent knows of one child: its process, its pipe, and what it has said."""

    process: multiprocessing.process.BaseProcess
    conn: Connection  # the parent's end: tasks go out, answers come back
    stack_path: str  # where the child writes its stack when asked
    started: bool = False  # it got through Python's start-up into the launch's child body
    answer: tuple[str, float, Any] | None = None  # this round's (kind, time.time(), body)

    def read(self) -> None:
        """Take in what the child sent; an ended process or a closed pipe without answer is a
        death. The answer's body: the unpickled result, a traceback, or the exit code."""
        try:
            while self.answer is None and self.conn.poll():
                kind, when, body = self.conn.recv()
                self.started = True
                if kind != "started":
                    self.answer = (kind, when, pickle.loads(body) if kind == "ok" else body)
        except EOFError:
            self.process.join(5)  # the pipe closes as the child exits: let it finish
        if self.answer is None and self.process.exitcode is not None:
            self.answer = ("died", time.time(), self.process.exitcode)


def progress_watch(world: int, progress: tuple | None) -> Any:
    """The ``progress.Watch`` of ``Pool.run(..., progress=(directory, stall_seconds))``, or None."""
    if progress is None:
        return None
    from sptutor.exercises.progress import Watch  # here: sptutor.exercises may import launch

    return Watch(world, *progress)


def report(ranks: list[Child], timeout: float, what: str, watch: Any = None) -> str:
    """Whom to blame: a missing guard, else the first rank that failed on its own (an error or a
    death), else the ranks that never answered; errors inside torch.distributed are reactions.
    ``what`` names the launcher in the message ('spawn', 'Pool', 'Pool.run'). A stall that
    ``watch`` (a ``progress.Watch``) found opens the message with where each rank waits."""
    answers = {i: rank.answer for i, rank in enumerate(ranks) if rank.answer is not None}
    unguarded = ("died", UNGUARDED_EXIT_CODE)  # the code a bootstrapping child exits with
    if any((a[0], a[2]) == unguarded and not ranks[i].started for i, a in answers.items()):
        return unguarded_message(what.split(".")[0])
    failed = sorted(i for i, (kind, _, _) in answers.items() if kind != "ok")
    own = [i for i in failed if answers[i][0] != "comm-error"]
    running = [i for i, rank in enumerate(ranks) if rank.answer is None]
    if own or not running:
        cause = min(own or failed, key=lambda i: answers[i][1])
        return _failure(ranks, cause, failed, running)
    if watch is not None and watch.fired:
        where = watch.describe()  # before the ranks are asked for their stacks
        stalled = f"{what} stalled: no rank made progress for {watch.seconds:g} s"
        return f"{where}\n{_hang(ranks, running, failed, stalled)}"
    return _hang(ranks, running, failed, f"{what} timed out after {timeout:g} s")


@dataclass
class _Answered:
    """A rank known only by its answer (torchrun's ranks gather theirs): what ``_failure`` reads."""

    answer: tuple[str, float, Any]
    started: bool = True


def blame(answers: list[tuple[str, float, Any]]) -> str | None:
    """:func:`report`'s message for ranks that all answered, each ``(kind, time.time(), body)``
    ("ok", or "error"/"comm-error" (:func:`kind_of`) with a traceback); None if all are "ok"."""
    failed = any(kind != "ok" for kind, _, _ in answers)
    return report([_Answered(a) for a in answers], timeout=0.0, what="") if failed else None


def _failure(ranks: list[Child], cause: int, failed: list[int], running: list[int]) -> str:
    """'rank 2 of 4 failed (then rank 0 failed too):' and its traceback, or how it died."""
    kind, _, body = ranks[cause].answer
    others = [i for i in failed if i != cause]
    what = _death(body, ranks[cause].started) if kind == "died" else "failed"
    after = f" (then {_who(others)} failed too)" if others else ""
    ended = f"; {_who(running)} still running, now ended" if running else ""
    text = f"rank {cause} of {len(ranks)} {what}{after}{ended}"
    return text + _struck(ranks[cause]) if kind == "died" else f"{text}:\n{body}"


def _struck(rank) -> str:
    """Where a rank killed by a fatal signal was, from the stack faulthandler wrote as it died
    ('' if none): the innermost call outside torch and sptutor.comm; for SIGABRT, what gloo
    aborts on."""
    path = getattr(rank, "stack_path", None)
    text = Path(path).read_text() if path and os.path.exists(path) else ""
    # the main thread runs the task (launch's _child); an abort in a gloo thread has no frames
    threads = [_FRAME.findall(block) for block in text.split("\n\n") if "hread 0x" in block]
    frames = next((f for f in threads if any(name == "_child" for *_, name in f)), [])
    caller = _caller(frames) if "Fatal Python error" in text else None
    if caller is None:
        return ""
    aborted = (" (SIGABRT: gloo, for one, aborts a rank that receives a message of another size "
               "than its buffer, and says so on stderr)") if "Aborted" in text else ""  # fmt: skip
    return f", in {caller[2]} at {caller[0]}:{caller[1]}{aborted}"


def _caller(frames: list[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    """The innermost frame outside torch and sptutor.comm: the code to look at."""
    return next((f for f in frames if _TORCH not in f[0] and not f[0].endswith(_COMM)), None)


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


def _hang(ranks: list[Child], running: list[int], failed: list[int], timed_out: str) -> str:
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
        head = f"{timed_out}: {_who(answered)} answered, {_who(running)} still running"
        tail = ""
    text = f"{head}; every rank is now ended."
    if stuck and (failed or len(stuck) < len(running)):
        text += f"\nHolding the others up (outside any collective they waited in): {_who(stuck)}."
    lines = "".join(f"\n  rank {i}: {where[i][1]}" for i in running)
    return f"{text}\nWhere each running rank was:{lines}{tail}"


def _ask_for_stacks(running: list[Child]) -> None:
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


def _where(rank: Child) -> tuple[bool | None, str]:
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
    caller = _caller(frames) or frames[-1]
    return True, (
        f"waiting in torch.distributed ({function}), called from {caller[2]} at "
        f"{caller[0]}:{caller[1]}"
    )


def kind_of(error: BaseException) -> str:
    """A RuntimeError raised inside torch.distributed, or by a transfer sptutor.comm waits for (a
    timeout, a lost peer), is a "comm-error": usually a reaction to another rank's failure, not
    a cause. Anything else is an "error"."""
    frames = list(traceback.walk_tb(error.__traceback__))
    module = frames[-1][0].f_globals.get("__name__", "") if frames else ""
    inside = module.startswith(("torch.distributed", "sptutor.comm"))
    return "comm-error" if isinstance(error, RuntimeError) and inside else "error"


def cannot_send(
    fn: Any, args: tuple, error: Exception, what: str, dumps: Callable[[Any], bytes]
) -> str:
    """Why ``dumps((fn, args))`` failed: the argument, or the global or closed-over variable of
    ``fn`` (or of a function it calls) that does not pickle, and what to do about it."""
    head = f"{what} cannot send {getattr(fn, '__qualname__', repr(fn))} to its ranks:"
    for index, arg in enumerate(args):
        if problem := _pickling_problem(arg, dumps):
            return (
                f"{head} argument {index}, {_a(arg)}, cannot be pickled ({problem}). Pass "
                "values that pickle (tensors, numbers, containers of them)."
            )
    if found := _unpicklable_variable(fn, dumps):
        owner, variable, value, problem = found
        return (
            f"{head} `{variable}`, {_a(value)} that {owner} uses, cannot be pickled ({problem}). "
            f"Import or create it inside {owner} instead, so that each rank makes its own."
        )
    return f"{head} it cannot be pickled ({error}). Build what it needs inside it instead."


def _pickling_problem(obj: Any, dumps: Callable[[Any], bytes]) -> str | None:
    """The error pickling ``obj`` raises, in words; None if it pickles."""
    try:
        dumps(obj)
    except Exception as error:
        return str(error) or type(error).__name__
    return None


def _a(value: Any) -> str:
    """'a _thread.lock', 'a generator': the type of ``value``, with its module if not builtin."""
    kind = type(value)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return f"a {module}{kind.__qualname__}"


def _unpicklable_variable(fn: Any, dumps: Callable[[Any], bytes]) -> tuple | None:
    """(function, variable, value, problem) for the first global or closed-over variable of
    ``fn`` that does not pickle, looking into the functions it calls; None if there is none."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    variables = {name: fn.__globals__[name] for name in _names(code) if name in fn.__globals__}
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        with contextlib.suppress(ValueError):  # an empty cell: a variable not yet assigned
            variables[name] = cell.cell_contents
    for name, value in variables.items():
        if problem := _pickling_problem(value, dumps):
            is_function = isinstance(value, types.FunctionType)
            inner = _unpicklable_variable(value, dumps) if is_function else None
            return inner or (fn.__qualname__, name, value, problem)
    return None


def _names(code: types.CodeType) -> list[str]:
    """The names a code object (and the code nested in it) looks up, in order of first use."""
    nested = [_names(c) for c in code.co_consts if isinstance(c, types.CodeType)]
    return list(dict.fromkeys([*code.co_names, *(name for names in nested for name in names)]))


def _who(ranks: list[int]) -> str:
    """'rank 1', 'ranks 0, 2, 3' or 'no rank'."""
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}" if ranks else "no rank"
