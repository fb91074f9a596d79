"""How the ``sptutor`` command prints: rich tables and progress bars on a terminal, plain text
anywhere else (a pipe, a file, a CI log), decided in one place: :func:`fancy`.

Every printer looks ``sys.stdout`` up when it is called, never at import, so output that is
redirected later (pytest's capture, a notebook) is where the text goes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

BAR_WIDTH = 20  # characters of the plain step line's bar


def fancy() -> bool:
    """True when stdout is a terminal: tables and bars drawn by rich; False: plain lines."""
    return sys.stdout.isatty()


def _console():
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False)


def cell(value: object) -> str:
    """One table cell as text: ints with thousands separators, True/False as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "-"
    return str(value)


def table(
    rows: Sequence[Sequence[object]],
    columns: Sequence[str],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Print ``rows`` (each one value per column) under ``columns``, then one line per note.

    Values become text with :func:`cell`; a text holding newlines is stacked lines in a rich
    cell and one line (joined with spaces) in plain text. Numbers are right-aligned.
    """
    texts = [[cell(value) for value in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(columns))]
    if fancy():
        _rich_table(texts, columns, numeric, title, notes)
    else:
        _plain_table(texts, columns, numeric, title, notes)
    sys.stdout.flush()


def _is_number(value: object) -> bool:
    """Numbers, None (shown as "-") and text that reads as a number (``"1.25"``, ``"1,024"``)."""
    if isinstance(value, str):
        try:
            float(value.replace(",", ""))
        except ValueError:
            return value == "-"
        return True
    return (isinstance(value, int | float) and not isinstance(value, bool)) or value is None


def _rich_table(texts, columns, numeric, title, notes) -> None:
    from rich.table import Table

    stacked = any("\n" in text for row in texts for text in row)  # a rule between rows
    shown = Table(title=title, title_justify="left", caption="\n".join(notes) or None,
                  caption_justify="left", show_lines=stacked)  # fmt: skip
    for name, is_number in zip(columns, numeric):
        shown.add_column(name, justify="right" if is_number else "left")
    for row in texts:
        shown.add_row(*row)
    _console().print(shown)


def _plain_table(texts, columns, numeric, title, notes) -> None:
    print(plain_table(texts, columns, numeric, title=title, notes=notes))


def plain_table(
    texts: Sequence[Sequence[str]],
    columns: Sequence[str],
    numeric: Sequence[bool],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """An aligned text table under a dashed rule, like the tour's (text cells; ``numeric``
    columns right-aligned); a cell's newlines become spaces."""
    lines = [[" ".join(t.split("\n")) for t in row] for row in texts]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]

    def join(values):
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)
        ).rstrip()

    head = [title] if title else []
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([*head, join(columns), rule, *map(join, lines), *notes])


def say(text: str, style: str = "bold") -> None:
    """Print a heading or a remark: styled on a terminal, plain otherwise."""
    if fancy():
        _console().print(text, style=style, markup=False)
    else:
        print(text, flush=True)


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` tasks on a terminal; yields ``done(label)``, called after each task.

    Plain text: one line per finished task, ``description: label (1.2 s)``.
    """
    if not fancy():
        last = [time.perf_counter()]

        def done(label: str) -> None:
            now = time.perf_counter()
            print(f"{description}: {label} ({now - last[0]:.1f} s)", flush=True)
            last[0] = now

        yield done
        return
    from rich.progress import Progress

    with Progress(console=_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda label: bar.update(task, advance=1, description=f"{description}: {label}")


def step_line(label: str, step: int, steps: int, loss: float, seconds: float) -> str:
    """``ring     step  3/10 [###-----------------] loss 4.1234  1.2 s``: the plain step line."""
    done = round(BAR_WIDTH * step / steps)
    bar = "#" * done + "-" * (BAR_WIDTH - done)
    width = len(str(steps))
    return f"{label:<8} step {step:>{width}}/{steps} [{bar}] loss {loss:.4f}  {seconds:.1f} s"


def step(label: str, step: int, steps: int, loss: float, seconds: float) -> None:
    """Print one training step: :func:`step_line`, or on a terminal the same with rich's bar."""
    if not fancy():
        print(step_line(label, step, steps, loss, seconds), flush=True)
        return
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    width = len(str(steps))
    line = Table.grid(padding=(0, 1))
    line.add_row(f"[bold cyan]{label:<8}[/] step {step:>{width}}/{steps}",
                 ProgressBar(total=steps, completed=step, width=BAR_WIDTH),
                 f"loss [bold]{loss:.4f}[/]  [dim]{seconds:.1f} s[/]")  # fmt: skip
    _console().print(line)


def save_figure(draw: Callable, path: Path) -> None:
    """Draw a matplotlib figure with ``draw()`` on the Agg backend (no window, no display) and
    save it to ``path``, in the format its suffix names (``.png``, ``.svg``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure = draw()
    try:
        figure.savefig(path, format=path.suffix.removeprefix("."), bbox_inches="tight")
    finally:
        pyplot.close(figure)
