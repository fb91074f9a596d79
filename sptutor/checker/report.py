"""What a check says: a verdict per case in a table, the smallest failing case's diagnosis in
words, and a standalone script that reproduces it."""

from __future__ import annotations

import dataclasses
import inspect
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
            text = f"{self.status.upper()}: {_first_line(self.error)}"
            return text if len(text) <= SUMMARY_WIDTH else text[: SUMMARY_WIDTH - 3] + "..."
        wrong = sorted({n for v in self.verdicts for n in v.wrong}, key=NAMES.index)
        problems = [p for v in self.verdicts for p in v.problems]
        text = "FAIL: " + ", ".join(wrong or problems[:1])
        return text if len(text) <= SUMMARY_WIDTH else text[: SUMMARY_WIDTH - 3] + "..."


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
            return f"{self.function} matches the {self.method} oracle in all {len(swept)} cases"
        shrunk = len(self.results) - len(swept)
        tail = f", shrunk in {shrunk} more runs" * bool(shrunk)
        return (f"{self.function} FAILS the {self.method} oracle: {len(swept) - passing} of "
                f"{len(swept)} cases fail{tail}")  # fmt: skip

    def details(self) -> list[str]:
        """The smallest failure in words: its case, the diagnosis, each rank's information."""
        if self.smallest is None:
            first = self.results[0] if self.results else None
            return [f"information: {line}" for line in _information(first)] if first else []
        lines = [f"smallest failing case: {self.smallest.case.describe()}"]
        if self.smallest.status in ("error", "hang"):
            lines.append(self.smallest.error.strip())
        lines += [f"  {sentence}" for sentence in self.smallest.diagnosis]
        lines += [f"information: {line}" for line in _information(self.smallest)]
        if self.reproducer:
            lines.append("reproduce it with this script (report.reproducer):")
            lines += [f"    {line}" for line in self.reproducer.splitlines()]
        return lines

    def __str__(self) -> str:
        numeric = [False, False, False, *(True for _ in NAMES)]
        table = console.plain_table(self.rows(), self.COLUMNS, numeric)
        return "\n".join([self.verdict(), table, *self.details()])

    def print(self) -> None:
        """Print the report: a rich table on a terminal, plain text elsewhere."""
        console.say(self.verdict())
        console.table(self.rows(), self.COLUMNS)
        for line in self.details():
            print(line)


def _information(result: CaseResult) -> list[str]:
    """Messages and saved bytes, rank by rank (information, not the verdict)."""
    return [f"rank {v.rank}: {'; '.join(v.information)}" for v in result.verdicts]


def _first_line(text: str) -> str:
    """The first line of a launch's report and the last line of its traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    head = re.sub(r"^(ranks? [\d, ]+) of \d+ failed.*", r"\1", lines[0].rstrip(":"))
    last = lines[-1].strip()
    return head if len(lines) == 1 or last in head else f"{head}: {last}"


def reproducer(fn, method: str, case: Case, options: dict) -> str:
    """A standalone script that runs ``check`` on ``case`` alone, with the same adapter."""
    imports, arguments = ["from sptutor.testing import Case, check"], []
    name = _importable(fn, imports) or "fn  # your function: import or define it here"
    for key, value in options.items():
        if callable(value):
            value = _importable(value, imports) or f"...  # your {key}: import or define it"
        else:
            value = repr(value)
        arguments.append(f"    {key}={value},")
    return "\n".join([
        *imports, "", f"case = {case!r}", "", 'if __name__ == "__main__":',
        f"    report = check(\n        {name.split('  #')[0]},", f'        method="{method}",',
        f"        world={case.world},", "        cases=[case],",
        *("    " + a for a in arguments), "    )", "    print(report)",
    ])  # fmt: skip


def _importable(obj, imports: list[str]) -> str | None:
    """``obj``'s name after adding its import, if it can be imported by name."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in name or "." in name:
        return None
    if inspect.ismodule(obj):
        return None
    imports.append(f"from {module} import {name}")
    return name
