"""The exercises' grader: run a learner's file over a sweep of cases, compare every shard with the
oracle and every message with the oracle's ledger, and explain the first failure in one sentence.

Three kinds of exercise file, told apart by their header (or their name):

- a method, ``ring.py`` (from ``sptutor/ring.py``): ``ring_attention`` on W gloo processes,
  shards and exact messages against the oracle (``sptutor.testing.check`` underneath);
- an emulated method, ``oracle_ring.py`` (from ``oracle/ring.py``): its ``emulate`` on the oracle's
  emulated World, in this process (a notebook on a laptop is enough);
- the blocks of chapter 0, ``blocks.py``: its ``merge`` and ``attention_block_backward`` against
  sptutor's own on seeded inputs.

The sentence names a category: TODO left, deadlock, wrong peer, messages in the wrong order or
of the wrong size, wrong shard or layout, a missing or wrong merge, a wrong mask, a block's
gradient sent to the wrong rank, a missing backward, a wrong all-to-all split, a state carried
wrongly, an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path

from sptutor import layout, oracle
from sptutor.checker.adapter import for_sptutor
from sptutor.checker.report import CaseResult, Report, error_summary
from sptutor.checker.sweep import check
from sptutor.methods import LINEAR_METHODS, METHODS

HEADER = re.compile(r"generated from (sptutor|oracle)/(\w+)\.py")
CATEGORIES = {  # words of a diagnosis -> its category, first match wins
    "a wrong mask": ("diagonal is masked", "causal flag"),
    "a missing or wrong merge": ("LSE", "merge", "own block", "last block", "mean of the blocks"),
    "a block's gradient sent to the wrong rank": ("contribution", "came home", "accumulators"),
    "a missing backward": ("autograd gave no gradient", "does not require grad"),
    "wrong peer": ("the wrong way", "masked as the block of"),
    "wrong shard or layout": ("shard went to the wrong rank", "token layout", "tensor_layout"),
    "a wrong all-to-all split": ("heads are permuted", "wrong token rows"),
    "a state carried wrongly": ("decay", "state", "own chunk"),
}


@dataclasses.dataclass
class Grade:
    """A graded file: its kind ("method", "emulated" or "blocks"), the method, the check's
    report, and the first failure in one sentence (``category``: '' when everything passed)."""

    path: Path
    kind: str
    method: str
    report: Report
    category: str = ""
    sentence: str = ""

    @property
    def passed(self) -> bool:
        return self.report.passed

    def __str__(self) -> str:
        verdict = "every case passes" if self.passed else f"{self.category}: {self.sentence}"
        return f"{self.report.verdict()}\n{self.report.table()}\n{self.path.name}: {verdict}"


def kind_of(path: Path) -> tuple[str, str]:
    """(kind, method) of an exercise file, from its header, else its name."""
    found = HEADER.search(path.read_text())
    side, name = found.groups() if found else (None, path.stem.removeprefix("oracle_"))
    if side is None:
        side = "oracle" if path.stem.startswith("oracle_") else "sptutor"
    if name == "blocks":
        return "blocks", "blocks"
    if name not in METHODS:
        raise ValueError(f"{path}: not an exercise of sptutor (its header names no method; "
                         f"copy one with `sptutor exercise NAME`)")  # fmt: skip
    return ("emulated" if side == "oracle" else "method"), name


def grade(
    path: str | Path,
    *,
    world: int = 4,
    stall_timeout: float = 10.0,
    examples: int = 12,
    seed: int | None = 0,
    pool=None,
) -> Grade:
    """Grade the exercise at ``path`` (cases: W = 1..world, layouts, causal or not, GQA, odd head
    dims, uneven shards, packed documents, float64); ``stall_timeout``: seconds without
    progress on any rank before the ranks are ended and the report says where each one waits."""
    path = Path(path).resolve()
    kind, method = kind_of(path)
    if kind == "blocks":
        from sptutor.exercises.grade_blocks import grade_blocks

        report = grade_blocks(load(path), examples=examples, seed=seed)
        return _explained(Grade(path, kind, method, report))
    options = dataclasses.asdict(for_sptutor(method)) | _sweep(method)
    options |= dict(method=method, world=world, examples=examples, seed=seed,
                    enforce=("messages",), dtypes=("float64",))  # fmt: skip
    if kind == "emulated":
        module = load(path)
        report = check(module.emulate, runner=_Emulated(module.emulate, world), **options)
    else:
        report = check(_FromFile(path, f"{method}_attention"), pool=pool,
                       stall_timeout=stall_timeout, **options)  # fmt: skip
    return _explained(Grade(path, kind, method, report))


def _sweep(method: str) -> dict:
    """What an exercise of ``method`` draws: every layout its method takes, S that W does not
    divide (shards of different lengths), and packed documents."""
    sizes = dict(uneven=(False, True), documents=(False, True))
    if method in LINEAR_METHODS:
        return dict(layouts=("contiguous",), causal=(True, False), decays=(True, False), **sizes)
    return dict(layouts=layout.LAYOUTS, causal=(False, True), **sizes)


def load(path: Path):
    """Import the learner's file as a module of its own (once per process)."""
    # named by the file's path and contents: a changed file is imported afresh
    digest = hashlib.sha1(f"{path}\0{path.read_text()}".encode()).hexdigest()[:12]
    name = f"sptutor_exercise_{path.stem}_{digest}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _FromFile:
    """The learner's function, imported from its file on the rank that calls it (picklable)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.__qualname__ = self.__name__ = name

    def __call__(self, *args, **kwargs):
        return getattr(load(self.path), self.name)(*args, **kwargs)


class _Emulated:
    """Cases on the oracle's emulated World, with the learner's ``emulate``: no processes."""

    def __init__(self, emulate, world: int) -> None:
        self.emulate, self.world = emulate, world

    def run(self, case, fn, adapter) -> list[dict] | CaseResult:
        q, k, v, dout = case.inputs()
        try:
            sim = oracle.simulate(
                case.method, q, k, v, dout, world=case.world, causal=case.causal,
                layout=case.layout, ulysses=case.ulysses, decay=case.decay_tensor(),
                emulate=self.emulate, cu_seqlens=case.cu_seqlens_tensor(),
            )  # fmt: skip
        except Exception:
            return CaseResult(
                case, "error", error=f"the emulation failed:\n{traceback.format_exc()}"
            )
        return [dict(out=r.out, lse=r.lse, dq=r.dq, dk=r.dk, dv=r.dv, traffic={}, notes=[],
                     messages=[e.key() for e in sim.ledger.messages(i)], saved=r.saved_bytes)
                for i, r in enumerate(sim.ranks)]  # fmt: skip

    def close(self) -> None:
        pass


def _explained(grade: Grade) -> Grade:
    """Fill in the first failure's category and sentence."""
    smallest = grade.report.smallest
    if smallest is None:
        return grade
    grade.category, grade.sentence = explain(smallest)
    grade.sentence += f" (case {smallest.case.describe()})"
    return grade


def _block_size_mismatch(result: CaseResult) -> bool:
    """Did a case whose shards differ in length fail on sizes? A block's maths on a K/V block
    and positions of different lengths, or a rank that gloo ended for receiving a message of
    another size than its buffer (SIGABRT; its peers then lose the connection): either way a
    block is taken for another rank's."""
    error = result.error
    in_blocks = "blocks.py" in error and bool(
        re.search(r"size of tensor a \(\d+\) must match", error)
    )
    in_blocks |= "fused.py" in error and bool(re.search(r"a block of \d+ \w+ has \d+", error))
    ended = "(SIGABRT)" in error or "Connection closed by peer" in error
    return result.case.uneven and (in_blocks or ended)


def explain(result: CaseResult) -> tuple[str, str]:
    """(category, one sentence) for a failing case."""
    if result.status in ("error", "hang"):
        todo = re.search(r"NotImplementedError: TODO\(([^)]*)\): (.*)", result.error)
        if todo:
            return "TODO left", f"TODO: {todo.group(1)}: {todo.group(2).strip()}"
        if result.status == "hang":
            return "deadlock", result.error.strip().splitlines()[0]
        if _block_size_mismatch(result):
            return "wrong peer", (
                "a block met positions or a buffer of another length (the shards are uneven "
                "here): the block a step holds is masked as another rank's, or received into a "
                "buffer sized for another rank's block; check whose block each step holds "
                f"({error_summary(result.error)})")  # fmt: skip
        return "an error", error_summary(result.error)
    differences = [(v.rank, v.difference) for v in result.verdicts if v.difference]
    wrong = any(v.wrong for v in result.verdicts)
    if differences:  # a message that differs explains wrong numbers only by a wrong peer
        category, sentence = _message_sentence(*differences[0])
        if not wrong or category == "wrong peer":
            return category, sentence
    about_tensors = [s for s in result.diagnosis if not re.match(r"rank \d+: messages:", s)]
    first = (about_tensors or result.diagnosis or ["the numbers are wrong"])[0]
    category = next((c for c, words in CATEGORIES.items() if any(w in first for w in words)),
                    "wrong numbers")  # fmt: skip
    if category == "wrong shard or layout" and result.case.method in ("ulysses", "usp"):
        category = "a wrong all-to-all split"  # there, tokens and heads move by all-to-all only
    return category, first


def _message_sentence(rank: int, difference: tuple) -> tuple[str, str]:
    """A message that differs from the oracle's, in words."""
    index, yours, theirs = difference

    def said(key):
        op, _, peer, nbytes, phase, step = key
        to = f" to rank {peer}" if peer is not None else ""
        return f"{op}{to} of {nbytes} bytes at {phase} step {step}"

    if yours is None:
        return (
            "messages in the wrong order or of the wrong size",
            f"rank {rank} stops after {index} messages; the oracle's next is {said(theirs)}",
        )
    if theirs is None:
        return (
            "messages in the wrong order or of the wrong size",
            f"rank {rank} sends one message more than the oracle: {said(yours)}",
        )
    if yours[0] == theirs[0] and yours[2] != theirs[2] and yours[4:] == theirs[4:]:
        return (
            "wrong peer",
            f"rank {rank} sends message {index} ({yours[0]} at {yours[4]} step "
            f"{yours[5]}) to rank {yours[2]}; the oracle sends it to rank {theirs[2]}",
        )
    return (
        "messages in the wrong order or of the wrong size",
        f"rank {rank}'s message {index} is {said(yours)}; the oracle's is {said(theirs)}",
    )


def add_parser(commands):
    """``sptutor grade PATH [--world 4] [--stall-timeout 10]``."""
    command = commands.add_parser(
        "grade", help="grade an exercise file against the oracle",
        description="Run your exercise (a method on W gloo processes; an emulated one or "
        "chapter 0's blocks in this process) over a sweep of cases, compare every shard and "
        "message with the oracle, and explain the first failure in one sentence. Exit code 0 "
        "only if every case passes. Under torchrun: torchrun --standalone --nproc_per_node 4 "
        "-m sptutor.grade PATH.",
    )  # fmt: skip
    command.add_argument("path", type=Path, help="your exercise file, e.g. ring.py")
    command.add_argument("--world", type=int, default=4, help="largest world size W (default 4)")
    command.add_argument("--stall-timeout", type=float, default=10.0,
                         help="seconds with no rank making progress before the ranks are "
                         "ended and the report says where each waits (default 10)")  # fmt: skip
    command.add_argument("--examples", type=int, default=12, help="cases drawn (default 12)")
    return command


def run(args, parser) -> int:
    """Grade, print (rank 0 only under torchrun), exit code 0 when every case passes."""
    from sptutor import torchrun

    try:
        graded = grade(args.path, world=args.world, stall_timeout=args.stall_timeout,
                       examples=args.examples)  # fmt: skip
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if torchrun.is_first():
        print(graded, flush=True)
    return torchrun.finish(0 if graded.passed else 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m sptutor.grade PATH ...`` (and under torchrun)."""
    import argparse

    parser = argparse.ArgumentParser(prog="sptutor grade")
    commands = parser.add_subparsers(dest="command", required=True)
    command = add_parser(commands)
    return run(parser.parse_args(["grade", *(sys.argv[1:] if argv is None else argv)]), command)
