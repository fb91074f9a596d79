"""``python -m sptutor.exercises.generate [--check]``: write every exercise from its solution.

For each method m, ``blanks/<m>.py.txt`` is ``sptutor/<m>.py`` and ``blanks/oracle_<m>.py.txt`` is
``oracle/<m>.py``, each region between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` replaced by its
``TODO`` (``sptutor.exercises.markers``), under a header that says how to grade the file;
``blanks/blocks.py.txt`` is chapter 0's: ``merge`` and ``attention_block_backward`` taken from
``sptutor.blocks`` with ``inspect``, bodies blanked, with the imports they need.

The blanks end in ``.py.txt`` on purpose: they are package data, not modules, so linters and
duplicate finders do not read them as copies of the solutions. ``--check`` regenerates them in
memory and exits 1 with a unified diff when a stored one differs (CI runs it).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from sptutor.exercises import NAMES, solution_of
from sptutor.exercises.markers import MarkerError, blank, parse

BLANKS = Path(__file__).resolve().parent / "blanks"
BLOCKS_FUNCTIONS = ("merge", "attention_block_backward")  # chapter 0's exercise, in this order
BLOCKS_DOCSTRING = '''"""Chapter 0's exercise: two functions of ``sptutor.blocks``, written by you.

``merge`` combines two partial attention results by their log-sum-exp (online softmax);
``attention_block_backward`` is one block's FlashAttention-2 backward. The grader compares yours
with sptutor's on seeded inputs; the helpers they call are imported from ``sptutor.blocks``.
"""
'''


def _module_of(name: str) -> str:
    """The module exercise ``name`` is generated from: 'sptutor.ring', 'sptutor.oracle.ring'."""
    if name.startswith("oracle_"):
        return f"sptutor.oracle.{name.removeprefix('oracle_')}"
    return f"sptutor.{name}"


def _header(name: str) -> str:
    """The comment that opens exercise ``name``: what it is, how to grade it, where it is from."""
    shown = solution_of(name)
    if name == "blocks":
        what = [
            '# sptutor exercise "blocks" (chapter 0, attention in blocks): merge and',
            f"# attention_block_backward of {shown}, their bodies blanked. Write each TODO,",
            "# then grade the file (in this process):",
            "#     sptutor grade blocks.py",
        ]
    elif name.startswith("oracle_"):
        what = [
            f'# sptutor exercise "{name}": {shown}, the emulation (every rank in this one',
            "# process), with the parts you write blanked. Write each TODO, then grade the file:",
            f"#     sptutor grade {name}.py",
        ]
    else:
        what = [
            f'# sptutor exercise "{name}": {shown}, the real torch.distributed code, with the',
            "# parts you write blanked. Write each TODO, then grade the file on W processes:",
            f"#     sptutor grade {name}.py",
            f"#     torchrun --standalone --nproc_per_node 4 -m sptutor.grade {name}.py",
        ]
    origin = [
        f"# This file was generated from {shown} (its BEGIN/END SOLUTION regions) by",
        f"# `python -m sptutor.exercises.generate`: fill in your copy (`sptutor exercise {name}`),",
        "# never the tracked one in sptutor/exercises/blanks/, which is regenerated.",
    ]
    return "".join(line + "\n" for line in what + origin)


def render(name: str) -> str:
    """The text of exercise ``name``, from its solution as installed (MarkerError if a marker
    cannot make a valid blank)."""
    if name == "blocks":
        return _header(name) + _render_blocks()
    shown = solution_of(name)
    text = Path(importlib.util.find_spec(_module_of(name)).origin).read_text(encoding="utf-8")
    regions = parse(text, shown)
    if not regions:
        raise MarkerError(f"{shown}: no BEGIN SOLUTION region: its exercise would ask for nothing")
    return _header(name) + blank(text, regions)


def _render_blocks() -> str:
    """Chapter 0's functions of ``sptutor.blocks``, blanked, with the imports they need."""
    blocks = importlib.import_module("sptutor.blocks")
    shown = solution_of("blocks")
    sources = [inspect.getsourcelines(getattr(blocks, name)) for name in BLOCKS_FUNCTIONS]
    spans = [(start, start + len(lines) - 1) for lines, start in sources]
    for region in parse(inspect.getsource(blocks), shown):  # every marker of the file is checked
        if not any(first <= region.begin and region.end <= last for first, last in spans):
            raise MarkerError(f"{shown}:{region.begin}: region {region.name!r} is outside "
                              f"{' and '.join(BLOCKS_FUNCTIONS)}, the only functions the blocks "
                              "exercise copies")  # fmt: skip
    pieces, texts = [], []
    for lines, start in sources:
        text = "".join(lines)
        regions = parse(text, shown, first_line=start)
        if not regions:
            raise MarkerError(f"{shown}:{start}: no BEGIN SOLUTION region in this function: "
                              "the blocks exercise would ask nothing of it")  # fmt: skip
        pieces.append(blank(text, regions, first_line=start))
        texts.append(text)
    return BLOCKS_DOCSTRING + "\n" + _imports(blocks, texts) + "\n\n" + "\n\n".join(pieces)


def _imports(module, sources: list[str]) -> str:
    """The import lines ``sources`` (functions of ``module``) need: the modules they use, then
    the module's own helpers they call."""
    used = {node.id for text in sources for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Name)}  # fmt: skip
    modules = sorted(n for n in used if inspect.ismodule(getattr(module, n, None)))
    helpers = sorted(
        n for n in used if n not in BLOCKS_FUNCTIONS
        and getattr(getattr(module, n, None), "__module__", None) == module.__name__
    )  # fmt: skip
    lines = ["from __future__ import annotations", ""]
    lines += [f"import {name}" for name in modules]
    if helpers:
        lines += ["", f"from {module.__name__} import {', '.join(helpers)}"]
    return "".join(line + "\n" for line in lines)


def render_all() -> dict[str, str]:
    """Every exercise: file name in ``blanks/`` -> its text."""
    return {f"{name}.py.txt": render(name) for name in NAMES}


def differences(fresh: dict[str, str], folder: Path = BLANKS) -> list[str]:
    """Unified-diff lines from the stored blanks in ``folder`` to ``fresh`` (empty: up to date);
    a missing blank, or a stored one no exercise makes, differs from an empty file."""
    stored = {path.name: path.read_text(encoding="utf-8") for path in folder.glob("*.py.txt")}
    diff = []
    for file in sorted(fresh.keys() | stored.keys()):
        old, new = stored.get(file, ""), fresh.get(file, "")
        if old != new:
            diff += difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                f"{folder.name}/{file} (stored)", f"{folder.name}/{file} (from the solution)",
            )  # fmt: skip
    return diff


def write(fresh: dict[str, str], folder: Path = BLANKS) -> list[str]:
    """Store ``fresh`` in ``folder``, removing blanks no exercise makes; returns what changed."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for path in folder.glob("*.py.txt"):
        if path.name not in fresh:
            path.unlink()
            changed.append(path.name)
    for file, text in fresh.items():
        path = folder / file
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(file)
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    """Write the blanks (0), or with ``--check`` compare them (0 up to date, 1 stale); 2 for a
    marker that cannot make a valid blank."""
    parser = argparse.ArgumentParser(
        prog="python -m sptutor.exercises.generate",
        description="Write every exercise (sptutor/exercises/blanks/) from its solution's "
        "BEGIN SOLUTION / END SOLUTION regions.",
    )  # fmt: skip
    stale = "write nothing; exit 1 with a diff if a stored blank is stale"
    parser.add_argument("--check", action="store_true", help=stale)
    args = parser.parse_args(argv)
    try:
        fresh = render_all()
    except MarkerError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        diff = differences(fresh, BLANKS)
        if diff:
            sys.stdout.writelines(diff)
            print(f"\nstale blanks in {BLANKS}: run `{parser.prog}` and commit them")
            return 1
        print(f"all {len(fresh)} blanks match their solutions")
        return 0
    changed = write(fresh, BLANKS)
    print(f"{len(changed)} of {len(fresh)} blanks rewritten in {BLANKS}" +
          "".join(f"\n  {file}" for file in changed))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
