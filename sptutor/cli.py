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
    bench = commands.add_parser("bench", help="time sptutor's Triton kernels on a GPU")
    bench.add_argument(
        "what", choices=["kernels", "lasp"], help="kernels (GPU), or LASP's torch backend (CPU)"
    )
    bench.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bench.add_argument("--quick", action="store_true", help="fewer, shorter sequences")
    _add_train_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "tour":
        from sptutor import tour

        tour.run()
    if args.command == "bench":
        from sptutor import bench as benchmarks

        if args.what == "lasp":
            return benchmarks.run_lasp(quick=args.quick)
        return benchmarks.run_kernels(dtype=args.dtype, quick=args.quick)
    if args.command == "train":
        from sptutor import train

        options = {k: v for k, v in vars(args).items() if k not in ("command", "baseline")}
        config = train.TrainConfig(**{k: v for k, v in options.items() if v is not None})
        train.run(config, baseline=args.baseline)
    return 0


def _add_train_parser(commands) -> None:
    """``sptutor train``: options of ``sptutor.train.TrainConfig``; unset ones keep its defaults."""
    command = commands.add_parser(
        "train", help="train a tiny GPT with a sequence-parallel method on W CPU processes"
    )
    methods = ["rsa", "ring", "ulysses", "usp", "lss", "lasp", "lasp2"]
    command.add_argument("--method", default="ring", choices=methods)
    command.add_argument("--world", type=int, default=4, help="number of processes W = sp * dp")
    for name in ("sp", "dp", "ulysses", "steps", "batch", "seq-len", "d-model", "heads-q",
                 "heads-kv", "layers", "seed"):  # fmt: skip
        command.add_argument(f"--{name}", type=int)
    command.add_argument("--layout", choices=["contiguous", "zigzag", "striped"])
    command.add_argument("--dtype", choices=["float32", "float64"])
    command.add_argument("--lr", type=float)
    command.add_argument(
        "--baseline", action="store_true", help="first train on one process, full attention"
    )


if __name__ == "__main__":
    raise SystemExit(main())
