"""The training data: the shipped essay as character ids, each step's global batch (the same on
every process), its packed documents, and one rank's piece of it."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import torch

from sptutor import layout
from sptutor.model import GPTConfig
from sptutor.parallel import Grid

if TYPE_CHECKING:
    from sptutor.train import TrainConfig

CORPUS = "sequence_parallelism.txt"


def load_corpus() -> tuple[torch.Tensor, int]:
    """The shipped essay as character ids: (N,) long, and the vocabulary size (its characters)."""
    text = resources.files("sptutor").joinpath("data", CORPUS).read_text(encoding="utf-8")
    characters = sorted(set(text))
    index = {c: i for i, c in enumerate(characters)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(characters)


def document_offsets(config: TrainConfig, step: int) -> torch.Tensor | None:
    """The step's packed documents, the same on every process and for every row: cu_seqlens
    (N+1,) with N = ``pack_documents`` non-empty documents, its N-1 cuts drawn from the seed among
    1..S-1; None without packing."""
    if not config.pack_documents:
        return None
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 500_009)
    cuts = torch.randperm(config.seq_len - 1, generator=generator)[: config.pack_documents - 1]
    return torch.cat([torch.tensor([0]), (cuts + 1).sort().values, torch.tensor([config.seq_len])])


def global_batch(ids: torch.Tensor, config: TrainConfig, step: int):
    """The step's sequences, the same on every process: inputs, targets: (dp·batch, S) each.

    Each row is S + 1 characters, inputs its first S, targets its last S (the next characters,
    taken before any sharding): one window of the corpus, or, packed, one excerpt per document of
    :func:`document_offsets` and then the first character of one more (each from its own random
    start), so the target of a document's last token is the next document's first character.
    """
    rows = config.grid_sizes()[1] * config.batch
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    offsets = document_offsets(config, step)  # packed: N documents, then one more character
    lengths = [config.seq_len + 1] if offsets is None else [*offsets.diff().tolist(), 1]
    starts = torch.randint(0, ids.numel() - config.seq_len - 1, (rows, len(lengths)),
                           generator=generator).tolist()  # fmt: skip
    windows = torch.stack([torch.cat([ids[s : s + n] for s, n in zip(row, lengths)])
                           for row in starts])  # fmt: skip
    return windows[:, :-1], windows[:, 1:]  # (rows, S+1) -> (rows, S) each


def local_batch(inputs: torch.Tensor, targets: torch.Tensor, grid: Grid, config: GPTConfig):
    """This rank's piece of a global batch: its replica's rows, its layout's tokens.

    inputs, targets: (dp·B, S) -> (B, S_r) each, W = ``grid.sp`` (S_r = S/W, or one token more
    or fewer when W does not divide S).
    """
    batch = inputs.shape[0] // grid.dp
    rows = slice(grid.dp_rank * batch, (grid.dp_rank + 1) * batch)
    tokens = layout.positions(
        inputs.shape[1], world=grid.sp, rank=grid.sp_rank, layout=config.layout,
        ulysses=config.ulysses,
    )  # fmt: skip
    return inputs[rows][:, tokens], targets[rows][:, tokens]
