"""What the chapters (notebooks) share: show a library function's source in a cell.

Code shown to a reader is read from the installed package with ``inspect.getsource``, never pasted
into the chapter, so a chapter cannot drift from the library it explains.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable


def show(function: Callable) -> None:
    """Display ``function``'s source, syntax-highlighted, as a notebook cell's output."""
    from IPython.display import Code, display  # the docs extra brings IPython (ipykernel)

    from sptutor.exercises.markers import without_markers  # the exercises' markers are not shown

    display(Code(without_markers(inspect.getsource(function)), language="python"))


def check_real(method: str, pool, *, examples: int = 8, **sweep):
    """A chapter's check of sptutor's own ``<method>_attention`` on 4 processes against the
    oracle: ``examples`` cases in float64 and float32, messages and saved bytes enforced.

    Prints the report and asserts what a chapter states: every case passed, and on 2 to 4 ranks
    every rank's ledger equals the oracle's, event by event. Returns the report.
    """
    from sptutor.testing import check_sptutor

    report = check_sptutor(method, world=4, examples=examples, dtypes=("float64", "float32"),
                           enforce=("messages", "saved"), pool=pool, **sweep)  # fmt: skip
    print(report)
    assert report.passed and len(report.results) == examples
    assert report.messages_exact
    return report
