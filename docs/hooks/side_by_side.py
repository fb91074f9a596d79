"""MkDocs hook: render each oracle/real pair of method files in two columns, differences marked.

``docs/side-by-side.md`` holds one marker per pair, ``<!-- side-by-side: ring -->``; at build time
this hook replaces it with a two-column table of ``oracle/ring.py`` next to ``sptutor/ring.py``
(Python's ``difflib.HtmlDiff``), read from the source tree, so the page can never go stale.

The same module measures how far a pair has drifted apart (:func:`differing_lines`) and finds
functions duplicated byte for byte across a pair (:func:`duplicated_functions`); the tests use
both. Registered in mkdocs.yml (``hooks:``); this folder is excluded from the site.
"""

from __future__ import annotations

import ast
import difflib
import re
from pathlib import Path

from sptutor.exercises.markers import without_markers

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ("ring", "rsa", "ulysses", "usp", "lss", "lasp", "lasp2")
MARKER = re.compile(r"<!-- side-by-side: (\w+) -->")


def pair_files(method: str) -> tuple[Path, Path]:
    """(oracle file, real file) of ``method``."""
    return ROOT / "oracle" / f"{method}.py", ROOT / "sptutor" / f"{method}.py"


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def code_lines(path: Path, name: str) -> list[str] | None:
    """The lines of top-level function ``name`` in ``path``, docstring, comments and blank
    lines removed, each stripped of indentation (None if there is no such function)."""
    node = _functions(path).get(name)
    if node is None:
        return None
    lines = path.read_text().splitlines()[node.lineno - 1 : node.end_lineno]
    body = node.body[0]
    if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant):  # the docstring
        start, end = body.lineno - node.lineno, body.end_lineno - node.lineno
        lines = lines[:start] + lines[end + 1 :]
    code = (line.split("  #")[0].strip() for line in lines)
    return [line for line in code if line and not line.startswith("#")]


def differing_lines(method: str, name: str) -> int:
    """How many lines of ``name`` (e.g. ``_forward``) one side of the pair has that the other
    does not (difflib's added + removed lines, after :func:`code_lines`)."""
    oracle_lines, real_lines = (code_lines(path, name) for path in pair_files(method))
    if oracle_lines is None or real_lines is None:
        raise ValueError(f"{method}: {name} is missing on one side")
    return sum(1 for line in difflib.ndiff(oracle_lines, real_lines) if line[:1] in "+-")


def duplicated_functions(method: str) -> list[str]:
    """Top-level functions with the same name and the same source (docstring aside) on both
    sides of the pair: pure maths that belongs in the shared plumbing."""
    oracle_file, real_file = pair_files(method)
    both = _functions(oracle_file).keys() & _functions(real_file).keys()
    return sorted(n for n in both if code_lines(oracle_file, n) == code_lines(real_file, n))


def _table(method: str) -> str:
    oracle_file, real_file = pair_files(method)
    table = difflib.HtmlDiff(tabsize=4, wrapcolumn=64).make_table(
        without_markers(oracle_file.read_text()).splitlines(),
        without_markers(real_file.read_text()).splitlines(),
        f"oracle/{method}.py (every rank in one process)",
        f"sptutor/{method}.py (one rank, torch.distributed)",
    )
    return f'\n\n<div class="side-by-side" markdown="0">\n{table}\n</div>\n\n'


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each ``<!-- side-by-side: NAME -->`` marker with the pair's table."""
    return MARKER.sub(lambda found: _table(found.group(1)), markdown)
