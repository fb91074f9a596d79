"""Training with SP × DP on 4 gloo processes == training the same model on one process.

One launch runs one training step for every method on both grids (SP=2 × DP=2 and SP=4 × DP=1),
plus DDP and FSDP2 variants, plus packed documents and uneven S (W not dividing S); a second launch
runs the training loop; a third and a fourth the CLI (the fourth packed, against its baseline).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

from sptutor import launch, train
from sptutor.model import GPTConfig, TinyGPT, sp_positions
from sptutor.parallel import average_gradients, make_grid, sum_over_sp, wrap_ddp, wrap_fsdp2
from sptutor.testing import assert_close

WORLD = 4
REPLICA_BATCH = 2
# float64, Hq=4 over Hkv=2 (GQA; Ulysses with U=4 replicates K/V heads), S=16 fits every layout
CONFIG = GPTConfig(vocab=13, d_model=16, heads_q=4, heads_kv=2, layers=2, seq_len=16,
                   dtype="float64")  # fmt: skip


@dataclass(frozen=True)
class StepCase:
    """One training step of ``method`` on an ``sp`` × (4/sp) grid, gradients synced by ``sync``:
    ``average`` (average_gradients), ``ddp``, ``fsdp2-dp`` or ``fsdp2-world``."""

    method: str
    sp: int
    layout: str = "contiguous"
    ulysses: int = 1
    sync: str = "average"
    explicit_positions: bool = False  # pass the layout's positions to the model by hand
    seq_len: int = CONFIG.seq_len  # S; W need not divide it
    documents: tuple[int, ...] | None = None  # cu_seqlens of packed documents
    rope_per_document: bool = False

    @property
    def config(self) -> GPTConfig:
        return replace(CONFIG, attention=self.method, layout=self.layout, ulysses=self.ulysses,
                       seq_len=self.seq_len, rope_per_document=self.rope_per_document)  # fmt: skip

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        return None if self.documents is None else torch.tensor(self.documents)

    @property
    def grid_key(self) -> tuple[int, int | None]:
        return self.sp, self.ulysses if self.method == "usp" else None


CASES = [
    *(StepCase(m, 2, lay) for m, lay in [("rsa", "zigzag"), ("ring", "striped"),
                                          ("ulysses", "contiguous"), ("lss", "zigzag")]),
    *(StepCase(m, 4, lay) for m, lay in [("rsa", "striped"), ("ring", "zigzag"),
                                          ("ulysses", "striped"), ("lss", "contiguous")]),
    StepCase("usp", 2, "zigzag", ulysses=2),  # U=2, R=1: pure Ulysses inside USP
    StepCase("usp", 4, "zigzag", ulysses=2),  # U=2, R=2
    *(StepCase(m, sp) for m in ("lasp", "lasp2") for sp in (2, 4)),
    StepCase("ring", 2, "zigzag", sync="ddp"),
    StepCase("lasp", 2, sync="ddp"),
    StepCase("usp", 2, "zigzag", ulysses=2, sync="fsdp2-dp"),
    StepCase("lasp2", 2, sync="fsdp2-dp"),
    StepCase("lss", 2, "striped", sync="fsdp2-world"),
    StepCase("ring", 4, "zigzag", sync="fsdp2-world"),
    StepCase("ring", 2, "zigzag", explicit_positions=True),  # the loss share still counts W
]  # fmt: skip

# Packed documents and uneven S. S=18 over SP=4 contiguous: shards [0,5) [5,10) [10,14) [14,18);
# documents cut at 3 and 11 (inside shards) and at 5 and 10 (rank edges), one of them one token.
EDGES = (0, 3, 5, 10, 11, 18)
# S=15 over SP=2: zigzag chunks [0,4) [4,8) [8,12) [12,15) (rank 0 holds 0-3 and 12-14), striped
# shards of 8 and 7 tokens; documents cut at 4 (a chunk edge), 6 and 13 (inside chunks)
ODD = (0, 4, 6, 13, 15)
PACKED_SOFTMAX = ("rsa", "ring", "ulysses", "usp", "lss")  # usp as U=2 (R=2 on SP=4, R=1 on 2)
PACKED_LINEAR = ("lasp", "lasp2")
U = {"usp": 2}
PACKED_CASES = [
    *(StepCase(m, 4, "contiguous", U.get(m, 1), seq_len=18, documents=EDGES,
               rope_per_document=rope) for m in PACKED_SOFTMAX for rope in (False, True)),
    *(StepCase(m, 2, lay, U.get(m, 1), seq_len=15, documents=ODD,
               rope_per_document=lay == "zigzag")
      for m in PACKED_SOFTMAX for lay in ("zigzag", "striped")),
    *(StepCase(m, 4, "zigzag", U.get(m, 1), seq_len=19) for m in PACKED_SOFTMAX),  # one document
    *(StepCase(m, 4, seq_len=18, documents=EDGES) for m in PACKED_LINEAR),
    *(StepCase(m, 2, seq_len=15, documents=ODD) for m in PACKED_LINEAR),
    *(StepCase(m, 4, seq_len=19) for m in PACKED_LINEAR),
]  # fmt: skip


def _global_batch(dp: int, seq_len: int = CONFIG.seq_len) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets: (dp·B, S), targets the next tokens taken before sharding."""
    generator = torch.Generator().manual_seed(dp)
    windows = torch.randint(0, CONFIG.vocab, (dp * REPLICA_BATCH, seq_len + 1),
                            generator=generator)  # fmt: skip
    return windows[:, :-1], windows[:, 1:]


def _wrap(model: TinyGPT, grid, sync: str):
    """The model as ``sync`` runs it: itself, under DDP, or sharded by FSDP2 (in place)."""
    if sync == "ddp":
        return wrap_ddp(model, grid)
    if sync.startswith("fsdp2"):
        return wrap_fsdp2(model, grid, over=sync.removeprefix("fsdp2-"))
    return model


def _one_step(case: StepCase, grid) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's loss and full parameter gradients after one synced backward."""
    model = TinyGPT(case.config)
    wrapped = _wrap(model, grid, case.sync)
    ids, targets = train.local_batch(*_global_batch(grid.dp, case.seq_len), grid, case.config)
    positions = None
    if case.explicit_positions:
        positions = sp_positions(case.config, ids.shape[1], group=grid.sp_group, mesh=grid.mesh)
    loss = wrapped(ids, targets, group=grid.sp_group, mesh=grid.mesh, positions=positions,
                   seq_len=case.seq_len, cu_seqlens=case.cu_seqlens)  # fmt: skip
    loss.backward()
    if case.sync == "average":
        average_gradients(model, grid)
    elif case.sync in ("ddp", "fsdp2-dp"):
        sum_over_sp(model, grid)
    grads = {name: p.grad for name, p in model.named_parameters()}
    full = {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}
    return loss.item(), full


def _steps_on_rank(rank: int, world: int, cases: list[StepCase]) -> list:
    """Make every grid once (collective, same order everywhere), then run each case's step."""
    keys = sorted({case.grid_key for case in cases}, key=str)
    grids = {key: make_grid(key[0], world // key[0], ulysses=key[1]) for key in keys}
    return [_one_step(case, grids[case.grid_key]) for case in cases]


def _baseline_step(case: StepCase) -> tuple[float, dict[str, torch.Tensor]]:
    """The same step on one process: full (or full linear) attention over the global batch."""
    model = TinyGPT(case.config.baseline())
    loss = model(*_global_batch(WORLD // case.sp, case.seq_len), cu_seqlens=case.cu_seqlens)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def step_results() -> dict[StepCase, list]:
    """Every case's step on every rank (one launch for all): case -> W x (loss, gradients)."""
    cases = CASES + PACKED_CASES
    results = launch.spawn(_steps_on_rank, WORLD, (cases,))
    return {case: [results[rank][i] for rank in range(WORLD)] for i, case in enumerate(cases)}


def _check_against_the_baseline(cases: list[StepCase], step_results) -> None:
    """Each case's loss and every rank's gradients == the single-process step's; prints the
    largest relative error per case."""
    report = []
    for case in cases:
        expected_loss, expected = _baseline_step(case)
        # the ranks' losses are shares: summed over SP and averaged over DP they give the mean
        total_loss = sum(loss for loss, _ in step_results[case]) / (WORLD // case.sp)
        assert abs(total_loss - expected_loss) <= 1e-10 * expected_loss, case
        worst = 0.0
        for rank, (_, grads) in enumerate(step_results[case]):
            for name, grad in grads.items():
                # float64 on both sides, same math reordered: the design's float64 tolerance
                error = assert_close(grad, expected[name], what=f"{case} rank {rank} {name}")
                worst = max(worst, error)
        packed = f"S={case.seq_len} docs={case.documents} rope/doc={case.rope_per_document}"
        report.append(f"{case.method:8} sp={case.sp} {case.layout:10} {case.sync:12} {packed} "
                      f"{worst:.1e}")  # fmt: skip
    print("\n" + "\n".join(report))


def test_one_step_gradients_equal_the_single_process_step(step_results):
    """Every method, SP=2×DP=2 and SP=4×DP=1, plain/DDP/FSDP2: gradients == one process's."""
    _check_against_the_baseline(CASES, step_results)


def test_packed_documents_and_uneven_shards_step_like_one_process(step_results):
    """cu_seqlens cut inside shards and at rank edges, W not dividing S, RoPE global or per
    document, softmax and linear methods: loss and every gradient == the single-process step."""
    _check_against_the_baseline(PACKED_CASES, step_results)


def test_usp_training_loop_matches_the_single_process_loss_curve():
    """train.run (what `sptutor train` runs), usp U=2 × R=2, float64: loss per step == baseline."""
    config = train.TrainConfig(
        method="usp", world=WORLD, sp=4, ulysses=2, layout="zigzag", dtype="float64", steps=5,
        batch=2, seq_len=32, d_model=32,
    )  # fmt: skip
    result = train.run(config, baseline=True, verbose=False)
    print(f"\nusp losses {result.losses}\nbaseline   {result.baseline_losses}")
    assert len(result.losses) == len(result.baseline_losses) == config.steps
    for step, (loss, expected) in enumerate(zip(result.losses, result.baseline_losses)):
        # float64, identical updates from identical gradients: the design's 1e-10 relative, per step
        assert abs(loss - expected) <= 1e-10 * abs(expected), f"step {step}: {loss} vs {expected}"


def test_cli_trains_lss_and_prints_a_falling_loss_per_step():
    """`sptutor train --method lss --world 4 --steps 3` (small model, SP=2 × DP=2) exits 0."""
    command = [sys.executable, "-m", "sptutor.cli", "train", "--method", "lss", "--world", "4",
               "--steps", "3", "--dp", "2", "--seq-len", "32", "--d-model", "32"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"^lss +step (\d)/3 \[[#-]+\] loss (\d+\.\d+)", done.stdout, re.MULTILINE)
    assert [int(step) for step, _ in lines] == [1, 2, 3], done.stdout
    losses = [float(loss) for _, loss in lines]
    assert losses[-1] < losses[0], losses  # AdamW at lr 3e-3 from a random init: falls at once


def test_cli_packs_documents_and_trains_like_one_process():
    """`sptutor train --pack-documents 3` on an uneven S=31 (SP=2 zigzag × DP=2), float64, with
    --baseline: it says what it packed, and the loss curve is the single-process one."""
    command = [sys.executable, "-m", "sptutor.cli", "train", "--method", "ring", "--world", "4",
               "--dp", "2", "--layout", "zigzag", "--seq-len", "31", "--pack-documents", "3",
               "--steps", "3", "--dtype", "float64", "--d-model", "32", "--baseline"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    offsets = train.document_offsets(train.TrainConfig(seq_len=31, pack_documents=3), 0)
    assert "3 documents packed per sequence" in done.stdout, done.stdout
    assert f"step 1: cu_seqlens={offsets.tolist()}" in done.stdout, done.stdout
    assert "not counted (3 of S=31 per sequence)" in done.stdout, done.stdout
    worst = re.search(r"largest relative difference from the baseline over 3 steps: (\S+)",
                      done.stdout)  # fmt: skip
    # float64, identical updates from identical gradients: the design's 1e-10 relative, per step
    assert worst and float(worst.group(1)) <= 1e-10, done.stdout
