"""``python -m sptutor.bench <what> [options]``: the same as ``sptutor bench <what> [options]``
(the arguments go to :func:`sptutor.cli.main`, parsed once there).

A module, so torchrun can start it on each of its ranks:
``torchrun --standalone --nproc_per_node 4 -m sptutor.bench time`` times the methods on
torchrun's ranks (``sptutor.bench.timing_torchrun``); rank 0 prints the table. Every other
benchmark (and ``--help``) is one process's work: under torchrun it runs on rank 0 alone, and
the other ranks exit 0 at once, so it prints once.
"""

from __future__ import annotations

import os
import sys

from sptutor import torchrun
from sptutor.cli import main


def bench(argv: list[str] | None = None) -> int:
    """``sptutor bench`` with ``argv`` (default: this process's arguments); under torchrun, on
    rank 0 only unless the benchmark is ``time``."""
    argv = sys.argv[1:] if argv is None else argv
    if torchrun.launched() and os.environ["RANK"] != "0" and "time" not in argv:
        return 0  # one process's benchmark: rank 0 runs and prints it
    return main(["bench", *argv])


if __name__ == "__main__":  # spawned ranks import this module again: start nothing then
    raise SystemExit(bench())
