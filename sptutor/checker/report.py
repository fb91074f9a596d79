"""What a check says: a verdict per case in a table, the smallest failing case's diagnosis in
words, and a standalone script that reproduces it."""

from __future__ import annotations

import dataclasses
import os
import re

from sptutor import console
from sptutor.checker.cases import Case
from sptutor.checker.compare import NAMES, RankVerdict

STATUSES = ("pass", "fail", "error", "hang")
SUMMARY_WIDTH = 72  # characters of the verdict cell; the details follow the table


@dataclasses.dataclass
class CaseResult:
    """One case's outcome: ``status`` pass / fail (numbers wrong) / error (a rank raised) /
    hang (no answer within the timeout); ``verdicts`` per rank (empty for error and hang);
    ``error`` the launch's own report for error and hang; ``shrinking``: run while shrinking."""

    case: Case
    status: str
    verdicts: list[RankVerdict] = dataclasses.field(default_factory=list)
    error: str = ""
    shrinking: bool = False
    diagnosis: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def worst(self, name: str) -> str:
        """The largest error of tensor ``name`` over the ranks, as text ('-': not checked)."""
        errors = [v.errors[name] for v in self.verdicts if name in v.errors]
        return f"{max(errors):.1e}" if errors else "-"

    def summary(self) -> str:
        """The verdict cell: 'pass', 'FAIL: dq, dk' or 'ERROR: rank 1 raised ...'."""
        if self.status == "pass":
            return "pass"
        if self.status in ("error", "hang"):
            return _clip(f"{self.status.upper()}: {error_summary(self.error)}")
        wrong = sorted({n for v in self.verdicts for n in v.wrong}, key=NAMES.index)
        problems = [p for v in self.verdicts for p in v.problems]
        return _clip("FAIL: " + ", ".join(wrong or problems[:1]))


@dataclasses.dataclass
class Report:
    """A check's report: ``results`` in the order run (sweep first, then the shrinking runs),
    ``smallest`` the smallest failing case (None if all passed), ``reproducer`` a script for it.
    ``str(report)`` is the whole report as text (what the pytest fixture asserts with)."""

    function: str
    method: str
    results: list[CaseResult]
    smallest: CaseResult | None = None
    reproducer: str = ""

    @property
    def passed(self) -> bool:
        return self.smallest is None and all(r.passed for r in self.results)

    @property
    def on_several_ranks(self) -> list[CaseResult]:
        """The sweep's cases on W > 1 ranks (those that send messages)."""
        return [r for r in self.results if not r.shrinking and r.case.world > 1]

    @property
    def messages_exact(self) -> bool:
        """Did every rank of every case on W > 1 ranks log its messages through sptutor's
        ledger, equal to the oracle's event by event? (what sptutor's own methods must do)"""
        several = self.on_several_ranks
        return bool(several) and all(v.messages_match and v.exact for r in several
                                     for v in r.verdicts)  # fmt: skip

    def rows(self) -> list[list[str]]:
        """Table rows: the sweep's cases, then the smallest failure if shrinking found it."""
        shown = [r for r in self.results if not r.shrinking]
        if self.smallest is not None and self.smallest not in shown:
            shown.append(self.smallest)
        rows = []
        for index, result in enumerate(shown, 1):
            label = "smallest" if result is self.smallest else str(index)
            rows.append([label, result.case.describe(), result.summary(),
                         *(result.worst(name) for name in NAMES)])  # fmt: skip
        return rows

    COLUMNS = ("#", "case", "verdict", *(f"err {n}" for n in NAMES))

    def verdict(self) -> str:
        """One sentence: how many cases passed, or which failed."""
        swept = [r for r in self.results if not r.shrinking]
        passing = sum(r.passed for r in swept)
        if self.passed:
            cases = f"all {len(swept)} cases" if len(swept) != 1 else "its one case"
            return f"{self.function} matches the {self.method} oracle in {cases}"
        shrunk = len(self.results) - len(swept)
        tail = f", shrunk in {shrunk} more runs" * bool(shrunk)
        return (f"{self.function} FAILS the {self.method} oracle: {len(swept) - passing} of "
                f"{len(swept)} cases fail{tail}")  # fmt: skip

    def details(self) -> list[str]:
        """The smallest failure in words: its case, the diagnosis, each rank's information."""
        if self.smallest is None:  # the information of the widest case: the most messages
            widest = max(self.results, key=lambda r: r.case.world, default=None)
            if widest is None:
                return []
            return [f"information (case {widest.case.describe()}):",
                    *(f"information: {line}" for line in _information(widest))]  # fmt: skip
        lines = [f"smallest failing case: {self.smallest.case.describe()}"]
        if self.smallest.status in ("error", "hang"):
            lines.append(self.smallest.error.strip())
        lines += [f"  {sentence}" for sentence in self.smallest.diagnosis]
        lines += [f"information: {line}" for line in _information(self.smallest)]
        if self.reproducer:
            lines.append("reproduce it with this script (report.reproducer):")
            lines += [f"    {line}" for line in self.reproducer.splitlines()]
        return lines

    def table(self) -> str:
        """The table of cases as plain text."""
        numeric = [False, False, False, *(True for _ in NAMES)]
        return console.plain_table(self.rows(), self.COLUMNS, numeric)

    def __str__(self) -> str:
        return "\n".join([self.verdict(), self.table(), *self.details()])

    def print(self) -> None:
        """Print the report: a rich table on a terminal, plain text elsewhere."""
        console.say(self.verdict())
        console.table(self.rows(), self.COLUMNS)
        for line in self.details():
            print(line)


def _clip(text: str) -> str:
    """A verdict cell no wider than SUMMARY_WIDTH."""
    return text if len(text) <= SUMMARY_WIDTH else text[: SUMMARY_WIDTH - 3] + "..."


def _information(result: CaseResult) -> list[str]:
    """Messages and saved bytes, rank by rank (information, not the verdict)."""
    return [f"rank {v.rank}: {'; '.join(v.information)}" for v in result.verdicts]


def error_summary(text: str) -> str:
    """A launch's failure in one line: who failed, the exception, and where it was raised
    ('rank 1: AssertionError (lasp_fuse_parallel.py:88, in forward)')."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    head = re.sub(r"^(ranks? [\d, ]+) of \d+ failed.*", r"\1", lines[0].rstrip(":"))
    last = lines[-1].strip()
    if len(lines) == 1 or last in head:
        return head
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
    where = f" ({os.path.basename(frames[-1][0])}:{frames[-1][1]}, in {frames[-1][2]})" if (
        frames) else ""  # fmt: skip
    return f"{head}: {last}{where}"


def reproducer(fn, method: str, case: Case, options: dict) -> str:
    """A standalone script that runs ``check`` on ``case`` alone, with the same adapter; what
    cannot be imported by name (a lambda, a function of a notebook) becomes a placeholder the
    script asks you to define."""
    imports, todo = ["from sptutor.testing import Case, check"], []
    name = _name_of(fn, "fn", imports, todo)
    arguments = [f"        {key}={_source(value, key, imports, todo)}," for key, value in
                 options.items()]  # fmt: skip
    return "\n".join([
        *imports, *todo, "", f"case = {case!r}", "", 'if __name__ == "__main__":',
        "    report = check(", f"        {name},", f'        method="{method}",',
        f"        world={case.world},", "        cases=[case],", *arguments, "    )",
        "    print(report)",
    ])  # fmt: skip


def _source(value, key: str, imports: list[str], todo: list[str]) -> str:
    """Python source for an option's value: callables by name, dicts item by item."""
    if callable(value):
        return _name_of(value, key, imports, todo)
    if isinstance(value, dict):
        items = (f"{k!r}: {_source(v, k, imports, todo)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return repr(value)


def _name_of(obj, role: str, imports: list[str], todo: list[str]) -> str:
    """``obj``'s name, importing it when it can be imported by name; else a placeholder
    ``your_<role>`` and a line saying to define it."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and module != "__main__" and "<" not in name and "." not in name:
        line = f"from {module} import {name}"
        if line not in imports:
            imports.append(line)
        return name
    placeholder = f"your_{role}"
    todo.append(f"# define {placeholder} here: {name or type(obj).__name__}, which could not be "
                "imported by name")  # fmt: skip
    return placeholder
