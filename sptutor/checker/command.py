"""``sptutor check MODULE:FUNCTION --method ring ...``: the checker on the command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from sptutor.methods import METHODS

ABOUT = "check your own sequence-parallel attention function against the oracle"
SWEEP_NUMBERS = {
    "per_rank": "tokens per rank to draw (zigzag: twice that)",
    "head_dims": "head dims D to draw",
    "batches": "batch sizes B to draw",
    "heads_kv": "K/V head counts to draw",
    "gqa": "ratios Hq/Hkv to draw",
}


def add_parser(commands) -> argparse.ArgumentParser:
    """The ``check`` subcommand: the function, the method, the adapter and the sweep."""
    command = commands.add_parser(
        "check", help=ABOUT,
        description="Run your per-rank attention function on W gloo processes over a sweep of "
        "cases, compare every rank with the oracle, and print a verdict per case and, for the "
        "smallest failing case, what is wrong where. Exit code 0 only if every case passes.",
    )  # fmt: skip
    add = command.add_argument
    add("function", metavar="MODULE:FUNCTION", help="your function, e.g. my_lib.attn:ring")
    add("--method", required=True, choices=METHODS, help="the method it implements")
    add("--world", type=int, default=4, help="largest world size W (default: %(default)s)")
    add("--adapter", metavar="MODULE:NAME", help="a dict of check() options to start from")
    add("--tensor-layout", choices=("bshd", "bhsd"), help="q, k, v, out as (B,S,H,D) or (B,H,S,D)")
    add("--causal-keyword", help="the keyword that takes causal ('none': not passed)")
    add("--group-keyword", help="the keyword that takes the process group ('none': not passed)")
    add("--layout-keyword", help="the keyword that takes the token layout's name")
    add("--returns", choices=("auto", "out", "out_lse"), help="what the function returns")
    add("--forward-only", action="store_true", help="check the forward only (no gradients)")
    add("--layouts", help="token layouts to draw, comma-separated (default: contiguous)")
    add("--dtypes", help="dtypes your code computes in, comma-separated (default: float32)")
    for name, about in SWEEP_NUMBERS.items():
        add("--" + name.replace("_", "-"), metavar="N,N", help=about + ", comma-separated")
    add("--causal", metavar="BOOL,BOOL", help="causal values to draw, e.g. true or false,true")
    add("--examples", type=int, default=20, help="cases to draw (default: %(default)s)")
    add("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    add("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    add("--enforce", help="'messages' and/or 'saved': make those differences fail")
    return command


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Import the function (and adapter), run the check, print the report; 0 if it passed."""
    from sptutor import torchrun
    from sptutor.checker.sweep import check

    try:
        fn = _load(args.function)
        options = dict(_load(args.adapter)) if args.adapter else {}
    except (ImportError, AttributeError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    options.pop("method", None)
    for name in ("tensor_layout", "causal_keyword", "group_keyword", "layout_keyword", "returns"):
        value = getattr(args, name)
        if value is not None:
            options[name] = None if value.lower() == "none" else value
    if args.forward_only:
        options["backward"] = False
    for name in ("layouts", "dtypes"):
        if getattr(args, name):
            options[name] = tuple(getattr(args, name).split(","))
    try:
        for name in SWEEP_NUMBERS:
            if getattr(args, name):
                options[name] = tuple(int(n) for n in getattr(args, name).split(","))
        if args.causal:
            options["causal"] = tuple(_boolean(word) for word in args.causal.split(","))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    enforce = tuple(args.enforce.split(",")) if args.enforce else ()
    try:
        report = check(fn, method=args.method, world=args.world, examples=args.examples,
                       seed=args.seed, timeout=args.timeout, enforce=enforce,
                       **options)  # fmt: skip
    except (TypeError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if torchrun.is_first():
        report.print()
    return torchrun.finish(0 if report.passed else 1)


def _boolean(word: str) -> bool:
    if word.lower() not in ("true", "false"):
        raise ValueError(f"--causal takes true and/or false, got {word!r}")
    return word.lower() == "true"


def _load(spec: str):
    """'package.module:name' -> the object (the current directory is importable)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected MODULE:NAME, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target
