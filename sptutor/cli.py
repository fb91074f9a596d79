"""sptutor teaches sequence parallelism for attention: how long-context training cuts one sequence
over several processes. Each method (rsa, ring, ulysses, usp, lss, lasp, lasp2) is written twice,
as a readable single-process oracle and as real torch.distributed code, and both are checked
against plain full attention. All of it runs on CPU processes; only 'sptutor bench kernels'
wants a GPU.

Start with 'sptutor tour', then train a tiny GPT with 'sptutor train --method ring'; see one call's
messages with 'sptutor trace ring --causal' and what each method costs with 'sptutor bench comm'.
Check your own implementation with 'sptutor check my_module:my_ring --method ring'; write one
yourself with 'sptutor exercise ring', then 'sptutor grade ring.py'.
"""

from __future__ import annotations

import argparse
import dataclasses
from importlib import metadata
from pathlib import Path

import sptutor
from sptutor.methods import METHODS
from sptutor.train import command as train_command
from sptutor.train.command import CHOICES

DEFAULT_OUT = "sptutor-bench"  # where a bare ``bench --out`` writes, in the current directory
EPILOG = """\
Each command has its own options: 'sptutor train --help'. The chapters that explain the methods
are notebooks in the chapters/ folder of the sptutor repository ('jupyter lab chapters/' opens
them); the docs site in docs/ publishes them ('mkdocs serve' in the repository's root builds
it), and the Python API is in the docstrings: 'python -c "import sptutor; help(sptutor)"'.
"""

TRACE_HELP = {
    "world": "number of emulated ranks W",
    "layout": "how the sequence is cut over the ranks (lasp, lasp2: contiguous only)",
    "causal": "causal mask (default: off, as in oracle.simulate)",
    "ulysses": "usp only: Ulysses degree U of its U x R mesh (default: 2)",
    "seq_len": "sequence length S, any S >= W (zigzag: S >= 2W; shards then differ by one token) "
    "(default: 16, or the last offset of --cu-seqlens)",
    "heads_q": "query heads Hq",
    "heads_kv": "key/value heads Hkv, dividing Hq",
    "head_dim": "head size D",
    "forward_only": "no backward: the forward's events only",
    "cu_seqlens": "packed documents: their global offsets, comma-separated, 0 first and S last, "
    "e.g. 0,5,17,32 (a query sees only keys of its own document)",
}
BENCHMARKS = {
    "kernels": "Triton kernels vs PyTorch's fused attention (GPU)",
    "lasp": "one LASP rank's time per token on the torch backend (CPU)",
    "comm": "bytes sent per rank: ledger = sptutor.cost, next to the papers' formulas",
    "memory": "bytes kept for backward per rank: oracle = sptutor.cost, next to full/W",
    "balance": "useful work per rank under a causal mask, per layout",
    "packed": "7 packed documents, S=1000, W=4: useful work and bytes per rank vs closed form",
    "time": "wall time on 1, 2, 4 gloo processes / one process, fwd + bwd, against the goal",
    "gpu": "the GPU check in one table: kernels vs truth, methods under torchrun vs oracle, speed",
}


def version() -> str:
    """The installed package's version (``sptutor.__version__`` when run from a bare checkout)."""
    try:
        return metadata.version("sptutor")
    except metadata.PackageNotFoundError:
        return sptutor.__version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sptutor`` console script and of ``python -m sptutor``."""
    parser = argparse.ArgumentParser(
        prog="sptutor",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sptutor {version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )
    about_tour = "measure and print what each sequence-parallel method rests on"
    commands.add_parser("tour", help=about_tour, description=_sentence(about_tour))
    trace_parser = _add_trace_parser(commands)
    bench_parser = _add_bench_parser(commands)
    train_parser = train_command.add_parser(commands)
    from sptutor.checker import command as check_command

    check_parser = check_command.add_parser(commands)
    from sptutor.exercises import command as exercise_command
    from sptutor.exercises import grade as grade_command

    exercise_parser = exercise_command.add_parser(commands)
    grade_parser = grade_command.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "tour":
        from sptutor import tour

        tour.run()
    if args.command == "trace":
        return _trace(args, trace_parser)
    if args.command == "bench":
        return _bench(args, bench_parser)
    if args.command == "train":
        return train_command.run(args, train_parser)
    if args.command == "check":
        return check_command.run(args, check_parser)
    if args.command == "grade":
        return grade_command.run(args, grade_parser)
    if args.command == "exercise":
        return exercise_command.run(args, exercise_parser)
    return 0


def _sentence(help_text: str) -> str:
    """A command's one-line help as the sentence its own ``--help`` opens with."""
    return help_text[:1].upper() + help_text[1:] + "."


def _add_trace_parser(commands) -> argparse.ArgumentParser:
    """``sptutor trace METHOD``: one option per field of ``sptutor.trace.TraceConfig``."""
    from sptutor import trace

    command = commands.add_parser(
        "trace", help="show one simulated call's schedule: who sends what to whom, who computes",
        description="Simulate one call of a method on small float64 inputs (the oracle) and print "
        "its schedule: per rank and phase, each message with its bytes and each block computed "
        "with its useful multiply-adds; or, with --out, draw it into a PNG or SVG file. With "
        "--cu-seqlens the documents are packed: it also shows which documents each rank holds, "
        "the blocks skipped because they share none, and the useful work per rank.",
    )  # fmt: skip
    command.add_argument("method", choices=METHODS, help="the method to trace")
    for field in dataclasses.fields(trace.TraceConfig)[1:]:
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            command.add_argument(flag, action="store_true", help=TRACE_HELP[field.name])
            continue
        if field.name == "cu_seqlens":  # parsed in _trace, so that a bad list reads like the rest
            command.add_argument(flag, metavar="OFFSETS", help=TRACE_HELP[field.name])
            continue
        known = field.default is not None
        command.add_argument(
            flag, default=field.default, type=type(field.default) if known else int,
            choices=CHOICES.get(field.name) if field.name == "layout" else None,
            help=TRACE_HELP[field.name] + (" (default: %(default)s)" if known else ""),
        )  # fmt: skip
    command.add_argument(
        "--out", type=Path, metavar="FILE",
        help="write the picture to FILE (.png or .svg) instead of printing",
    )  # fmt: skip
    return command


def _trace(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the call (``TraceConfig.check``) and ``--out`` up front; a broken one ends as
    ``sptutor trace: error: <sentence>``, exit code 2."""
    from sptutor import trace

    options = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    try:
        if options["cu_seqlens"] is not None:
            options["cu_seqlens"] = trace.parse_cu_seqlens(options["cu_seqlens"])
        config = trace.TraceConfig(**options)
        trace.check_out(args.out)
        config.check()
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return trace.run(config, args.out)


def _add_bench_parser(commands) -> argparse.ArgumentParser:
    """``sptutor bench kernels|lasp|comm|memory|balance|time``."""
    about = "benchmarks: bytes, memory and balance from the oracle; times on CPU processes or GPU"
    bench = commands.add_parser(
        "bench", help=about, description=_sentence(about) + " " + "; ".join(
            f"{name}: {text}" for name, text in BENCHMARKS.items()) + ".",
    )  # fmt: skip
    bench.add_argument("what", choices=list(BENCHMARKS), help="which benchmark (see above)")
    bench.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="dtype of the kernels' inputs (kernels only) (default: %(default)s)",
    )  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="fewer, shorter cases")
    bench.add_argument(
        "--out", nargs="?", const=DEFAULT_OUT, type=Path, metavar="DIR",
        help="comm, memory, balance, packed, time: also write <what>.json (the figures) and "
        f"<what>.png (a plot) into DIR, created if needed; --out alone: ./{DEFAULT_OUT} "
        "(default: print only)",
    )  # fmt: skip
    return bench


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the chosen benchmark; ``--out`` on kernels or lasp ends as an error, exit code 2."""
    from sptutor import bench

    if args.what in ("kernels", "lasp"):
        if args.out is not None:
            parser.exit(2, f"{parser.prog}: error: --out is for comm, memory, balance, packed "
                        f"and time, not {args.what}\n")  # fmt: skip
        if args.what == "lasp":
            return bench.run_lasp(quick=args.quick)
        return bench.run_kernels(dtype=args.dtype, quick=args.quick)
    from importlib import import_module

    module = import_module(f"sptutor.bench.{'timing' if args.what == 'time' else args.what}")
    return module.run(out=args.out, quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
