"""``torchrun -m sptutor.bench time``: the methods timed on torchrun's ranks (gloo here, NCCL on
GPUs) instead of spawned processes; rank 0 prints the one table, the other ranks nothing."""

import os
import subprocess
import sys
from pathlib import Path

from sptutor.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


def test_bench_time_under_torchrun_prints_one_table_from_rank_0():
    """Two torchrun ranks: exit 0, the header, the W=2 columns and each method's row once."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "sptutor.bench", "time", "--quick"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("wall time, causal forward + backward") == 1, out
    assert out.count("torchrun, W=2") == 1, out
    rows = [line.split()[0] for line in out.splitlines() if line.split()]
    assert all(rows.count(name) == 1 for name in ("method", *METHODS)), out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert "W=2 ratio" in header and header.endswith("W=2 meets")
    assert "W=1" not in header  # torchrun's world only
    assert "time on 2 gloo ranks" in out


def test_a_one_process_benchmark_under_torchrun_runs_on_rank_0_alone():
    """``-m sptutor.bench packed --quick`` and ``--help`` on two torchrun ranks: printed once."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for argv, said in ((["packed", "--quick"], "7 documents"), (["--help"], "usage: sptutor")):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", "-m", "sptutor.bench", *argv]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count(said) == 1, done.stdout
