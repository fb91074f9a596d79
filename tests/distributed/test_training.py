"""Training with SP × DP on 4 gloo processes == training the same model on one process.

One launch runs one training step for every method on both grids (SP=2 × DP=2 and SP=4 × DP=1),
plus DDP and FSDP2 variants; a second launch runs the training loop; a third the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace

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

    @property
    def config(self) -> GPTConfig:
        return replace(CONFIG, attention=self.method, layout=self.layout, ulysses=self.ulysses)

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


def _global_batch(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets: (dp·B, S), targets the next tokens taken before sharding."""
    generator = torch.Generator().manual_seed(dp)
    windows = torch.randint(0, CONFIG.vocab, (dp * REPLICA_BATCH, CONFIG.seq_len + 1),
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
    ids, targets = train.local_batch(*_global_batch(grid.dp), grid, case.config)
    positions = None
    if case.explicit_positions:
        positions = sp_positions(case.config, ids.shape[1], group=grid.sp_group, mesh=grid.mesh)
    loss = wrapped(ids, targets, group=grid.sp_group, mesh=grid.mesh, positions=positions)
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
    loss = model(*_global_batch(WORLD // case.sp))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def test_one_step_gradients_equal_the_single_process_step():
    """Every method, SP=2×DP=2 and SP=4×DP=1, plain/DDP/FSDP2: gradients == one process's."""
    results = launch.spawn(_steps_on_rank, WORLD, (CASES,))
    report = []
    for index, case in enumerate(CASES):
        expected_loss, expected = _baseline_step(case)
        # the ranks' losses are shares: summed over SP and averaged over DP they give the mean
        total_loss = sum(results[rank][index][0] for rank in range(WORLD)) / (WORLD // case.sp)
        assert abs(total_loss - expected_loss) <= 1e-10 * expected_loss, case
        worst = 0.0
        for rank in range(WORLD):
            for name, grad in results[rank][index][1].items():
                # float64 on both sides, same math reordered: the design's float64 tolerance
                error = assert_close(grad, expected[name], what=f"{case} rank {rank} {name}")
                worst = max(worst, error)
        report.append(f"{case.method:8} sp={case.sp} {case.layout:10} {case.sync:12} {worst:.1e}")
    print("\n" + "\n".join(report))


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
