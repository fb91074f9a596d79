"""Each oracle/real pair reads side by side: the pure maths lives once in the plumbing, the step
loops stay close, and every file keeps to one job (at most 300 lines)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "docs/hooks/side_by_side.py")
side_by_side = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(side_by_side)


@pytest.mark.parametrize("method", side_by_side.PAIRS)
def test_no_function_is_written_twice_across_a_pair(method):
    """A function with the same name and body on both sides is maths the plumbing should hold."""
    assert side_by_side.duplicated_functions(method) == []


@pytest.mark.parametrize("method", side_by_side.PAIRS)
def test_both_sides_have_the_same_skeleton(method):
    """_forward and _backward exist on both sides (the step loops a reader compares)."""
    for name in ("_forward", "_backward"):
        for path in side_by_side.pair_files(method):
            assert side_by_side.code_lines(path, name) is not None, (path, name)


def test_every_library_file_keeps_to_one_job():
    """No module of sptutor/ (subpackages included) or oracle/ is over 300 lines."""
    files = [*ROOT.glob("sptutor/**/*.py"), *ROOT.glob("oracle/*.py")]
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in files}
    assert {name: n for name, n in lengths.items() if n > 300} == {}
