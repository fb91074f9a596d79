"""The package maps (the design page's and the README's) name every module of sptutor/, and
nothing that is not there: a module added or removed without its line in the maps fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> set[str]:
    """``name.py`` for each module of sptutor/, ``name/`` for each subpackage (its own files
    are the subpackage's business)."""
    found = {f"{p.name}/" for p in (ROOT / "sptutor").iterdir() if (p / "__init__.py").is_file()}
    found |= {p.name for p in (ROOT / "sptutor").glob("*.py")}
    return found - {"__init__.py", "__main__.py"}


def _anything_there() -> set[str]:
    """Every file name and folder under sptutor/ (a map may name a subpackage's files too)."""
    where = ROOT / "sptutor"
    return {p.name for p in where.rglob("*.py")} | {f"{p.name}/" for p in where.rglob("*")
                                                    if p.is_dir()} | {"sptutor/"}  # fmt: skip


def _named(block: str) -> set[str]:
    """Module and folder names a map block mentions: ``x.py`` and ``x/``."""
    return set(re.findall(r"(?<![\w/.])(\w+\.py|\w+/)(?![\w])", block))


def _code_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    opening = text.index("```", start)
    return text[opening : text.index("```", opening + 3)]


def test_the_design_pages_package_map_lists_every_module():
    block = _code_block_after((ROOT / "docs" / "design.md").read_text(), "### Package map")
    sptutor_part = block.split("\noracle/")[0]
    modules, named = _modules(), _named(sptutor_part)
    assert modules <= named, f"missing from the design page's map: {sorted(modules - named)}"
    there = _anything_there()
    assert named <= there, f"not in sptutor/: {sorted(named - there)}"


def test_the_readmes_layout_lists_every_module():
    block = _code_block_after((ROOT / "README.md").read_text(), "## Layout of the repository")
    sptutor_part = block.split("\noracle/")[0]
    modules, named = _modules(), _named(sptutor_part)
    assert modules <= named, f"missing from the README's layout: {sorted(modules - named)}"
    there = _anything_there()
    assert named <= there, f"not in sptutor/: {sorted(named - there)}"
