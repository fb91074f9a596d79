"""Exercises generated from the solutions: a method's own file with its teachable regions blanked.

Every method file marks what a learner writes between ``# BEGIN SOLUTION <region>: <what>`` and
``# END SOLUTION`` (``sptutor.exercises.markers``); ``python -m sptutor.exercises.generate``
turns each region into a ``TODO(<region>)`` that raises ``NotImplementedError`` and stores the
result in ``blanks/`` as package data. The exercises, by name:

- ``ring``, ``rsa``, ... (the seven methods): ``sptutor/<m>.py``, the real torch.distributed code,
  graded on W processes (``sptutor grade ring.py``);
- ``oracle_ring``, ...: ``oracle/<m>.py``, the emulation, graded in one process;
- ``blocks``: chapter 0's ``merge`` and ``attention_block_backward`` (``sptutor/blocks.py``).

:func:`copy` writes one into a folder to fill in; :func:`todos` lists what it asks for.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from sptutor.methods import METHODS

NAMES = (*METHODS, *(f"oracle_{method}" for method in METHODS), "blocks")
_TODO = re.compile(
    r"^[ \t]*# TODO\((?P<name>[^)]*)\): (?P<description>.*)\n"
    r"[ \t]*# \(the solution is (?P<lines>\d+) lines?\)$",
    re.MULTILINE,
)


class Todo(NamedTuple):
    """One blanked region: its name, what to write (one line), and the solution's size."""

    name: str
    description: str
    lines: int


def check_name(name: str) -> None:
    """ValueError, listing the exercises, unless ``name`` is one of :data:`NAMES`."""
    if name not in NAMES:
        raise ValueError(f"no exercise is named {name!r}; the exercises are {', '.join(NAMES)}")


def solution_of(name: str) -> str:
    """The file an exercise is generated from, as the repository names it: 'sptutor/ring.py'."""
    check_name(name)
    if name.startswith("oracle_"):
        return f"oracle/{name.removeprefix('oracle_')}.py"
    return f"sptutor/{name}.py"


def blank(name: str) -> str:
    """The text of exercise ``name``, read from the installed package data."""
    check_name(name)
    return (resources.files(__name__) / "blanks" / f"{name}.py.txt").read_text(encoding="utf-8")


def todos(name: str) -> list[Todo]:
    """The regions exercise ``name`` blanks, in file order."""
    found = _TODO.finditer(blank(name))
    return [Todo(m["name"], m["description"], int(m["lines"])) for m in found]


def copy(name: str, directory: str | Path = ".", *, force: bool = False) -> Path:
    """Write exercise ``name`` to ``directory/<name>.py`` (the folder is made if missing) and
    return that path; an existing file is kept (FileExistsError) unless ``force``."""
    text = blank(name)
    path = Path(directory) / f"{name}.py"
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists and may hold your work: keep it, or "
                              f"overwrite it with force=True (sptutor exercise {name} "
                              "--force)")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
