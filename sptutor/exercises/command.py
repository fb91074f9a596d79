"""``sptutor exercise NAME [--dir DIR] [--force] [--list]``: copy an exercise to fill in."""

from __future__ import annotations

import argparse

from sptutor.exercises import NAMES, copy, solution_of, todos
from sptutor.methods import METHODS

ABOUT = "copy an exercise: a method's own file with the parts you write blanked"


def add_parser(commands) -> argparse.ArgumentParser:
    """The ``exercise`` subcommand: which exercise, where to write it, or the list of them."""
    command = commands.add_parser(
        "exercise", help=ABOUT,
        description="Write NAME.py into a folder: the method's file from sptutor with each "
        "region you write replaced by a TODO that raises NotImplementedError. Fill them in, then "
        "grade the file with 'sptutor grade NAME.py'. NAME is a method (the real "
        "torch.distributed code), oracle_METHOD (its emulation, one process) or blocks "
        "(chapter 0). '--list' shows every exercise and what it asks for.",
    )  # fmt: skip
    add = command.add_argument
    add("name", nargs="?", metavar="NAME", help="the exercise, e.g. ring or oracle_ring")
    add("--dir", default=".", help="the folder to write NAME.py in (default: the current one)")
    add("--force", action="store_true", help="overwrite an existing NAME.py")
    add("--list", action="store_true", help="list the exercises and their TODOs, write nothing")
    return command


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """List the exercises, or copy one and say how to grade it; 0 on success."""
    if args.list:
        print(listing())
        return 0
    if args.name is None:
        parser.error("the exercise NAME is required (or --list to see them)")
    try:
        path = copy(args.name, args.dir, force=args.force)
    except (ValueError, FileExistsError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote {path}: {len(todos(args.name))} TODOs to write; then grade it with")
    print(f"    sptutor grade {path}")
    if args.name in METHODS:  # the real code runs on W processes: torchrun can start them
        print(f"    torchrun --standalone --nproc_per_node 4 -m sptutor.grade {path}")
    return 0


def listing() -> str:
    """Every exercise, the file it comes from, and each TODO with its solution's size."""
    lines = []
    for name in NAMES:
        lines.append(f"{name}  (from {solution_of(name)})")
        for todo in todos(name):
            size = f"{todo.lines} line" + ("" if todo.lines == 1 else "s")
            lines.append(f"    TODO({todo.name}) [{size}]: {todo.description}")
    return "\n".join(lines)
