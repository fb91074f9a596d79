"""``python -m sptutor.bench <what> [options]``: the same as ``sptutor bench <what> [options]``
(the arguments go to :func:`sptutor.cli.main`, parsed once there).

A module, so torchrun can start it on each of its ranks:
``torchrun --standalone --nproc_per_node 4 -m sptutor.bench time`` times the methods on
torchrun's ranks (``sptutor.bench.timing_torchrun``); rank 0 prints the table.
"""

from __future__ import annotations

import sys

from sptutor.cli import main


def bench(argv: list[str] | None = None) -> int:
    """``sptutor bench`` with ``argv`` (default: this process's arguments)."""
    return main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # spawned ranks import this module again: start nothing then
    raise SystemExit(bench())
