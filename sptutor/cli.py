"""The ``sptutor`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sptutor`` console script."""
    parser = argparse.ArgumentParser(prog="sptutor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "tour", help="measure and print what each sequence-parallel method rests on"
    )
    args = parser.parse_args(argv)
    if args.command == "tour":
        from sptutor import tour

        tour.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
