"""``sptutor train`` and ``python -m sptutor.train``: one parser for both, and, under torchrun
(``torchrun --standalone --nproc_per_node N -m sptutor.train ...``), the same options on
torchrun's ranks, W being its WORLD_SIZE."""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch.distributed as dist

from sptutor import layout, torchrun, train
from sptutor.methods import METHODS

TRAIN_HELP = {
    "method": "sequence-parallel attention: softmax (rsa, ring, ulysses, usp, lss) or linear "
    "(lasp, lasp2)",
    "world": "number of CPU processes W = sp * dp",
    "sp": "sequence-parallel degree: processes that share one sequence (default: world / dp)",
    "dp": "data-parallel degree: replicas, each on its own sequences (default: world / sp)",
    "ulysses": "usp only: Ulysses degree U of its U x R mesh (default: 2 if sp is even, else 1)",
    "steps": "optimizer steps",
    "layout": "how a sequence is cut over the sp processes (lasp, lasp2: contiguous only)",
    "dtype": "dtype of the weights and activations",
    "batch": "sequences per DP replica and step",
    "seq_len": "characters per sequence, S",
    "d_model": "model width; head size d_model / Hq must be even (RoPE rotates pairs)",
    "heads_q": "query heads Hq",
    "heads_kv": "key/value heads Hkv, dividing Hq (Hkv < Hq is GQA)",
    "layers": "transformer blocks",
    "lr": "AdamW learning rate",
    "seed": "seed of the weights and of the batches",
    "pack_documents": "pack N documents into each sequence, cut anew each step from the seed "
    "(attention stays inside a document; a document's last token predicts nothing); 0: no packing",
    "rope_per_document": "RoPE angles from each token's position inside its document, not its "
    "global position (softmax methods)",
}
CHOICES = {"method": METHODS, "layout": layout.LAYOUTS, "dtype": ("float32", "float64")}
UNDER_TORCHRUN = " (under torchrun: its WORLD_SIZE, which --world must equal if given)"


def add_parser(commands) -> argparse.ArgumentParser:
    """Add ``train`` to ``commands`` (an ``add_subparsers`` result) and return its parser: one
    option per field of ``sptutor.train.TrainConfig``, its default (``--world`` none under
    torchrun: WORLD_SIZE), and ``--baseline``."""
    launched = torchrun.launched()
    command = commands.add_parser(
        "train", help="train a tiny GPT with a sequence-parallel method on W CPU processes",
        description="Train a tiny GPT on a shipped essay, character by character, with one "
        "sequence-parallel method on W = sp * dp CPU processes; rank 0 prints the loss per step. "
        "Under torchrun (torchrun --nproc_per_node N -m sptutor.train ...) on torchrun's N ranks: "
        "NCCL on cuda:LOCAL_RANK when CUDA is available, gloo on the CPU otherwise.",
    )  # fmt: skip
    for field in dataclasses.fields(train.TrainConfig):
        flag, about = "--" + field.name.replace("_", "-"), TRAIN_HELP[field.name]
        if field.type == "bool":
            command.add_argument(flag, action="store_true", help=about + " (default: %(default)s)")
            continue
        known = field.default is not None  # sp, dp, ulysses: derived, said in their help
        default = None if launched and field.name == "world" else field.default
        about += UNDER_TORCHRUN if field.name == "world" else ""
        command.add_argument(
            flag, default=default, type=type(field.default) if known else int,
            choices=CHOICES.get(field.name),
            help=about + (" (default: %(default)s)" if known and default is not None else ""),
        )  # fmt: skip
    command.add_argument(
        "--baseline", action="store_true",
        help="first train the same model on one process, attention unsplit, and compare the losses",
    )  # fmt: skip
    return command


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the run's preconditions (``TrainConfig.check``) before any process starts, then
    train (``train.run``, or ``train.run_torchrun`` on torchrun's ranks); a broken one ends as
    ``sptutor train: error: <sentence>``, exit code 2 (under torchrun: on every rank, rank 0
    printing it). Returns 0."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "baseline")}
    launched = torchrun.launched()
    if launched:
        size = int(os.environ["WORLD_SIZE"])
        if options["world"] not in (None, size):
            _fail(parser, f"--world {options['world']} is not torchrun's WORLD_SIZE={size}: "
                  "leave --world out under torchrun, or make them equal")  # fmt: skip
        options["world"] = size
    config = train.TrainConfig(**options)
    try:
        config.check()
    except ValueError as error:
        _fail(parser, str(error))
    if not launched:
        train.run(config, baseline=args.baseline)
        return 0
    train.run_torchrun(config, baseline=args.baseline)  # an error: a traceback, torchrun ends all
    dist.destroy_process_group()
    return 0


def _fail(parser: argparse.ArgumentParser, sentence: str) -> None:
    """End as ``<prog>: error: <sentence>``, exit code 2: parser.error's line without the usage;
    under torchrun printed by rank 0 only (every rank exits)."""
    first = os.environ.get("RANK", "0") == "0"
    parser.exit(2, f"{parser.prog}: error: {sentence}\n" if first else None)
