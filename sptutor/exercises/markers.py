"""The ``# BEGIN SOLUTION`` / ``# END SOLUTION`` markers of a solution file, read and blanked.

A region is written in the solution, around whole statements at one indentation level::

    # BEGIN SOLUTION ring forward: pass K, V on, attend to the block held, merge it by its LSE
    ...the solution's own code...
    # END SOLUTION

and its blank is, at the marker's indentation, the region's TODO, its size and a raise::

    # TODO(ring forward): pass K, V on, attend to the block held, merge it by its LSE
    # (the solution is 14 lines)
    raise NotImplementedError("TODO(ring forward): pass K, V on, attend to the block held, ...")

:func:`parse` checks the markers (balanced, not nested, names unique, each region's blank valid
Python) and raises :class:`MarkerError` naming the file and line; :func:`blank` writes the blanks.
"""

from __future__ import annotations

import dataclasses
import re

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\b(?P<rest>.*)$")
END = re.compile(r"^(?P<indent>[ \t]*)# END SOLUTION\b(?P<rest>.*)$")
LABEL = re.compile(r"^ (?P<name>[^\s:()][^:()]*?): (?P<description>\S.*?)\s*$")


class MarkerError(ValueError):
    """A marker that cannot make a valid blank; the message starts with ``file:line:``."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One region of a solution: ``begin`` and ``end`` are the 1-based lines of its markers,
    ``indent`` the markers' indentation, ``lines`` the solution's non-empty lines between them."""

    name: str
    description: str
    indent: str
    begin: int
    end: int
    lines: int

    @property
    def todo(self) -> str:
        """``TODO(<name>): <description>``: the blank's comment and its error message."""
        return f"TODO({self.name}): {self.description}"

    def blank_lines(self) -> list[str]:
        """The three lines that replace the region (markers included), at its indentation."""
        size = f"{self.lines} line" + ("" if self.lines == 1 else "s")
        message = self.todo.replace("\\", "\\\\").replace('"', '\\"')
        return [
            f"{self.indent}# {self.todo}\n",
            f"{self.indent}# (the solution is {size})\n",
            f'{self.indent}raise NotImplementedError("{message}")\n',
        ]


def parse(text: str, filename: str, *, first_line: int = 1) -> list[Region]:
    """The regions of ``text`` (the source of ``filename``, whose first line is ``first_line``
    there), checked: every region's blank must compile on its own and all of them together."""
    lines = text.splitlines(keepends=True)
    regions, names, opened = [], {}, None
    for index, line in enumerate(lines):
        number = first_line + index
        where = f"{filename}:{number}"
        begin, end = BEGIN.match(line.rstrip("\n")), END.match(line.rstrip("\n"))
        if begin:
            if opened is not None:
                raise MarkerError(f"{where}: BEGIN SOLUTION inside region {opened[0]!r} (opened "
                                  f"at line {opened[2]}): regions do not nest")  # fmt: skip
            opened = (*_label(begin, where, names, number), number, begin["indent"], index)
        elif end:
            if opened is None:
                raise MarkerError(f"{where}: END SOLUTION with no BEGIN SOLUTION open")
            if end["rest"].strip():
                raise MarkerError(f"{where}: END SOLUTION takes nothing after it, got "
                                  f"{end['rest'].strip()!r}")  # fmt: skip
            name, description, start, indent, start_index = opened
            if end["indent"] != indent:
                raise MarkerError(f"{where}: END SOLUTION of region {name!r} must be indented "
                                  f"like its BEGIN SOLUTION at line {start}")  # fmt: skip
            body = lines[start_index + 1 : index]
            _check_body(body, indent, name, f"{filename}:{start}")
            size = sum(1 for body_line in body if body_line.strip())
            regions.append(Region(name, description, indent, start, number, size))
            opened = None
    if opened is not None:
        raise MarkerError(f"{filename}:{opened[2]}: region {opened[0]!r} has no END SOLUTION")
    for region in regions:
        _check_compiles(text, [region], filename, first_line, f"{filename}:{region.begin}")
    _check_compiles(text, regions, filename, first_line, filename)
    return regions


def _label(begin: re.Match, where: str, names: dict, number: int) -> tuple[str, str]:
    """(name, description) of a BEGIN SOLUTION marker; the name must be new in the file."""
    label = LABEL.match(begin["rest"])
    if label is None:
        raise MarkerError(f"{where}: BEGIN SOLUTION needs ' <region name>: <what to write>' (a "
                          f"name without ':' or parentheses), got {begin['rest']!r}")  # fmt: skip
    name = label["name"].strip()
    if name in names:
        raise MarkerError(f"{where}: region {name!r} is already the region at line {names[name]}")
    if not begin["indent"]:
        raise MarkerError(f"{where}: region {name!r} is at module level: its blank would raise "
                          "on import (mark statements inside a function)")  # fmt: skip
    names[name] = number
    return name, label["description"]


def _check_body(body: list[str], indent: str, name: str, where: str) -> None:
    """The region holds statements that start at its markers' indentation, none outside it."""
    code = [line for line in body if line.strip()]
    if not code:
        raise MarkerError(f"{where}: region {name!r} is empty")
    first_indent = code[0][: len(code[0]) - len(code[0].lstrip())]
    if first_indent != indent:
        raise MarkerError(f"{where}: region {name!r} must start at its markers' indentation "
                          f"({len(indent)} columns); its first line has "
                          f"{len(first_indent)}")  # fmt: skip
    for line in code:
        if not line.startswith(indent):
            raise MarkerError(f"{where}: region {name!r} holds a line indented less than its "
                              f"markers: {line.strip()!r}")  # fmt: skip


def _check_compiles(text, regions, filename, first_line, where) -> None:
    """The blank of ``regions`` must be valid Python (whole statements were marked)."""
    try:
        compile(blank(text, regions, first_line=first_line), filename, "exec")
    except SyntaxError as error:
        names = ", ".join(repr(region.name) for region in regions)
        raise MarkerError(f"{where}: the blank of region {names} does not compile ({error.msg}, "
                          f"blank line {error.lineno}): mark whole statements at one "
                          "indentation level") from error  # fmt: skip


def blank(text: str, regions: list[Region], *, first_line: int = 1) -> str:
    """``text`` with each of ``regions`` (from :func:`parse` of the same text) blanked, the
    other regions' markers removed and their solutions kept."""
    lines = text.splitlines(keepends=True)
    blanked = {region.begin: region for region in regions}
    out, skipping = [], False
    for index, line in enumerate(lines):
        number = first_line + index
        if number in blanked:
            out.extend(blanked[number].blank_lines())
            skipping = True
        elif END.match(line.rstrip("\n")):
            skipping = False
        elif not skipping and not BEGIN.match(line.rstrip("\n")):
            out.append(line)
    return "".join(out)


def without_markers(text: str) -> str:
    """``text`` with its BEGIN/END SOLUTION marker lines removed: the solution as a reader of
    the library (a chapter, the side-by-side page) should see it."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not (BEGIN.match(line) or END.match(line)))  # fmt: skip
