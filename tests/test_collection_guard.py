"""The whole suite must collect tests/distributed/: pytest's default norecursedirs (which holds
``dist``) once skipped the multi-process tests in CI without a word."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_whole_suite_collects_the_distributed_folder_and_the_guard_fires_without_it():
    """A bare run collects tests/distributed/; hiding the folder makes the bare run fail, while a
    subset (-k, a path, --ignore) is left alone."""
    bare = _collect()
    assert bare.returncode == 0, bare.stdout + bare.stderr
    assert "tests/distributed/" in bare.stdout
    hidden = _collect("-o", "norecursedirs=distributed")
    assert hidden.returncode != 0
    assert "collected no test from tests/distributed/" in hidden.stdout + hidden.stderr
    for subset in (("-k", "layout"), ("tests/test_layout.py",), ("--ignore=tests/distributed",)):
        picked = _collect("-o", "norecursedirs=distributed", *subset)
        assert picked.returncode == 0, picked.stdout + picked.stderr
