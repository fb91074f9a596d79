"""Train the tiny GPT on W processes with any SP method: what ``sptutor train`` runs (W gloo
processes, :func:`run`) and ``torchrun -m sptutor.train`` (torchrun's ranks, NCCL on GPUs,
:func:`run_torchrun`).

The corpus is an essay on sequence parallelism that ships with sptutor (``sptutor/data/``), read
character by character. At each step the same global batch of ``dp · batch`` windows is drawn on
every process (a seeded generator), targets are the next characters **before** sharding, DP
replica d takes rows ``d·batch ..``, and SP rank r takes its layout's tokens of them. The
single-process baseline trains the same model with full attention on the whole global batch, so
both loss curves can be compared step by step.

Any S >= W works (the model gets ``seq_len=S``; shards then differ by one token). With
``pack_documents=N`` each sequence packs N documents instead of one window: N-1 cut points drawn
from the seed each step (anywhere: inside shards, at rank edges), the same for every row, and each
document an excerpt of its own from a random place of the essay. The model gets their
``cu_seqlens``: attention stays inside a document, and the target of a document's last token (the
first character of the next document, or past the sequence) is not counted in the loss.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sptutor import console, launch, layout, torchrun
from sptutor.checks import check_ulysses_heads
from sptutor.mesh import check_mesh_sizes
from sptutor.methods import METHODS
from sptutor.model import GPTConfig, TinyGPT
from sptutor.parallel import Grid, average_gradients, make_grid
from sptutor.train.batches import (  # noqa: F401 (CORPUS: re-exported)
    CORPUS,
    document_offsets,
    global_batch,
    load_corpus,
    local_batch,
)

SIZES = ("world", "steps", "batch", "seq_len", "d_model", "heads_q", "heads_kv", "layers")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch`` is the number of sequences per DP replica; ``sp``/``dp``
    default to ``sp = world``, ``dp = 1`` (or whichever one is missing); ``ulysses`` (usp only)
    defaults to 2 when ``sp`` is even, else 1. ``pack_documents``: documents per sequence (0:
    one window of the corpus per sequence, no packing); ``rope_per_document``: RoPE angles from
    each token's position inside its document."""

    method: str = "ring"
    world: int = 4
    sp: int | None = None
    dp: int | None = None
    ulysses: int | None = None
    steps: int = 20
    layout: str = "contiguous"
    dtype: str = "float32"
    batch: int = 4
    seq_len: int = 64
    d_model: int = 64
    heads_q: int = 4
    heads_kv: int = 2
    layers: int = 2
    lr: float = 3e-3
    seed: int = 0
    pack_documents: int = 0
    rope_per_document: bool = False

    def grid_sizes(self) -> tuple[int, int]:
        """(sp, dp) with ``sp · dp == world``."""
        sp, dp = self.sp, self.dp
        if sp is None:
            sp = self.world // (dp or 1)
        if dp is None:
            dp = self.world // sp
        if sp < 1 or dp < 1 or sp * dp != self.world:
            raise ValueError(f"need sp*dp == world, got sp={sp}, dp={dp}, world={self.world}")
        return sp, dp

    def ulysses_degree(self) -> int:
        """U: ``ulysses`` if set (only usp may set it), else 2 for usp on an even ``sp``, else 1."""
        if self.ulysses is not None:
            return self.ulysses
        return 2 if self.method == "usp" and self.grid_sizes()[0] % 2 == 0 else 1

    def check(self) -> None:
        """Raise ``ValueError`` with the library's sentence unless this run can start: what each
        rank would find, in the order it would find it, checked before any process is spawned."""
        self._check_values()
        sp, _ = self.grid_sizes()
        degree = self.ulysses_degree()
        if self.method == "usp":
            check_mesh_sizes(degree, sp // degree, sp)  # make_grid's USP mesh
        self.model_config(vocab=1)  # method, head sizes, lasp's layout, U only for usp
        corpus_length = load_corpus()[0].numel()
        if self.seq_len + 1 >= corpus_length:
            raise ValueError(
                "each training window needs S + 1 < N characters of the corpus, "
                f"got S={self.seq_len}, N={corpus_length}"
            )
        layout.check_layout(self.seq_len, world=sp, layout=self.layout, ulysses=degree)
        heads_split_over = {"ulysses": sp, "usp": degree}.get(self.method)  # all-to-all ranks
        if heads_split_over:
            check_ulysses_heads(self.heads_q, self.heads_kv, heads_split_over)

    def _check_values(self) -> None:
        """Every size >= 1 (sp, dp, ulysses when set), lr >= 0, dtype a torch float dtype."""
        given = [(name, getattr(self, name)) for name in SIZES]
        given += [(name, getattr(self, name)) for name in ("sp", "dp", "ulysses")
                  if getattr(self, name) is not None]  # fmt: skip
        for name, value in given:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got lr={self.lr}")
        if not 0 <= self.pack_documents < self.seq_len:
            raise ValueError(
                "pack_documents must be 0 (no packing) or N < S (every document at least one "
                "token, and one target left to predict inside a document), got "
                f"pack_documents={self.pack_documents}, S={self.seq_len}"
            )
        dtype = getattr(torch, self.dtype, None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must name a torch float dtype, got dtype={self.dtype!r}")

    def describe(self) -> str:
        """One line: ``usp: W=4 as SP=4 (U=2 x R=2) x DP=1, layout=zigzag, float32, 20 steps``
        (then ``, 3 documents packed per sequence`` when packing)."""
        sp, dp = self.grid_sizes()
        degree = self.ulysses_degree()
        mesh = f" (U={degree} x R={sp // degree})" if self.method == "usp" else ""
        packed = f", {self.pack_documents} documents packed per sequence"
        return (
            f"{self.method}: W={self.world} as SP={sp}{mesh} x DP={dp}, layout={self.layout}, "
            f"{self.dtype}, {self.steps} steps{packed if self.pack_documents else ''}"
        )

    def model_config(self, vocab: int) -> GPTConfig:
        """The GPT this run trains, with ``method`` as its attention."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        return GPTConfig(
            vocab=vocab, d_model=self.d_model, heads_q=self.heads_q, heads_kv=self.heads_kv,
            layers=self.layers, seq_len=self.seq_len, attention=self.method, layout=self.layout,
            ulysses=self.ulysses_degree(), dtype=self.dtype,
            rope_per_document=self.rope_per_document,
        )  # fmt: skip


@dataclass
class TrainResult:
    """Global loss per step of the SP × DP run, and of the single-process baseline (if run)."""

    losses: list[float]
    baseline_losses: list[float] | None = None


def train_on_rank(
    rank: int, world: int, config: TrainConfig, verbose: bool, device: torch.device | None = None
) -> list[float]:
    """Body of each process: build the grid and the model, train, return the global losses.

    ``device``: where the model and every batch live (default: the CPU; the model moves the
    cu_seqlens to its inputs' device); the process group must reach it (gloo the CPU, NCCL
    ``cuda:LOCAL_RANK``). Rank 0 prints a line per step when ``verbose``. Returns
    ``config.steps`` floats, the same on every rank.
    """
    ids, vocab = load_corpus()
    sp, dp = config.grid_sizes()
    grid = make_grid(sp, dp, ulysses=config.ulysses_degree() if config.method == "usp" else None)
    model_config = config.model_config(vocab)
    model = TinyGPT(model_config, seed=config.seed).to(device)  # built on CPU: the same everywhere
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        shards = local_batch(*global_batch(ids, config, step), grid, model_config)
        ids_shard, targets_shard = (x.to(device) for x in shards)  # (B, S_r) each
        loss = model(ids_shard, targets_shard, group=grid.sp_group, mesh=grid.mesh,
                     seq_len=config.seq_len, cu_seqlens=document_offsets(config, step))  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        average_gradients(model, grid)
        optimizer.step()
        losses.append(_global_loss(loss, grid))
        if verbose and rank == 0:
            console.step(config.method, step + 1, config.steps, losses[-1],
                         time.perf_counter() - start)  # fmt: skip
    return losses


def _global_loss(loss: torch.Tensor, grid: Grid) -> float:
    """The global-batch mean loss: sum of every rank's share, over dp replicas.

    Bookkeeping for the printout, not training traffic: plain torch.distributed, kept out of the
    ledger.
    """
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / grid.dp


def _announce(config: TrainConfig) -> None:
    """Print what the run is (and, packing, what packing does, with step 1's cu_seqlens)."""
    print(config.describe(), flush=True)
    if config.pack_documents:
        count, first = config.pack_documents, document_offsets(config, 0).tolist()
        print(f"packing {count} documents per sequence, cut anew each step (step 1: cu_seqlens="
              f"{first}); attention stays inside each document; the target of each document's "
              f"last token is not counted ({count} of S={config.seq_len} per sequence)",
              flush=True)  # fmt: skip


def _compare(losses: list[float], reference: list[float]) -> None:
    """Print the largest relative difference between the two loss curves."""
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"largest relative difference from the baseline over {len(losses)} steps: "
          f"{worst:.2e}", flush=True)  # fmt: skip


@contextmanager
def one_thread():
    """Run torch on one intra-op thread meanwhile: a tiny model gains nothing from more, and next
    to W worker processes on a few cores extra threads only fight over them (we measured 65x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_thread()
def train_single(
    config: TrainConfig, verbose: bool = True, device: torch.device | None = None
) -> list[float]:
    """The baseline: the same model with full attention on one process, whole global batch, on
    ``device`` (default: the CPU). Returns ``config.steps`` losses; prints a line per step when
    ``verbose``."""
    ids, vocab = load_corpus()
    model_config = config.model_config(vocab).baseline()
    model = TinyGPT(model_config, seed=config.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        inputs, targets = (x.to(device) for x in global_batch(ids, config, step))  # (dp·B, S)
        loss = model(inputs, targets, cu_seqlens=document_offsets(config, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if verbose:
            console.step(model_config.attention, step + 1, config.steps, losses[-1],
                         time.perf_counter() - start)  # fmt: skip
    return losses


def run(config: TrainConfig, *, baseline: bool = False, verbose: bool = True) -> TrainResult:
    """Train on ``config.world`` gloo processes (and, with ``baseline``, on one process first).

    Prints one progress line per step (rank 0) when ``verbose``; returns both loss curves.
    """
    config.check()  # every precondition, before starting any process
    if verbose:
        _announce(config)
    reference = train_single(config, verbose) if baseline else None
    losses = launch.spawn(train_on_rank, config.world, (config, verbose))[0]
    if verbose and reference is not None:
        _compare(losses, reference)
    return TrainResult(losses, reference)


def run_torchrun(config: TrainConfig, *, baseline: bool = False, verbose: bool = True):
    """Train on the ranks torchrun started, this process being one of them (every rank calls it).

    Joins torchrun's group (``sptutor.torchrun.init``: NCCL and ``cuda:LOCAL_RANK`` when CUDA is
    available, else gloo on the CPU, one thread per rank as :func:`run`'s processes); its
    WORLD_SIZE must be ``config.world`` (``ValueError`` otherwise, as for any precondition, before
    any collective). With ``baseline`` rank 0 trains the single-process baseline first, on its
    device. Rank 0 prints what :func:`run` prints. Returns a :class:`TrainResult`: the global
    losses on every rank, the baseline's on rank 0 only.
    """
    torchrun.init()
    world, rank = dist.get_world_size(), dist.get_rank()
    if config.world != world:
        raise ValueError(f"world must be torchrun's WORLD_SIZE={world}, got world={config.world}")
    config.check()
    here, first = torchrun.device(), rank == 0
    if verbose and first:
        _announce(config)
    with one_thread() if here.type == "cpu" else nullcontext():
        reference = train_single(config, verbose, here) if baseline and first else None
        losses = train_on_rank(rank, world, config, verbose, here)
    if verbose and reference is not None:
        _compare(losses, reference)
    return TrainResult(losses, reference)
