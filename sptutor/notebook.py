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
