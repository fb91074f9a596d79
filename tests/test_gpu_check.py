"""The GPU check (scripts/gpu_check.sh, ``sptutor bench gpu``) as a CPU smoke test: the same
command end to end, kernels under the Triton interpreter, gloo with W=2, speed rows "no GPU";
every row there, every correctness row passing. And the pieces it rests on: the 16-bit rule's
verdicts, and imports that need nothing the GPU image lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sptutor import cli
from sptutor.bench import gpu, gpu_kernels
from sptutor.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of ``bash scripts/gpu_check.sh --cpu --out DIR``: (exit code, stdout, rows)."""
    out = tmp_path_factory.mktemp("gpu")
    environment = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=environment, cwd=out,
    )  # fmt: skip
    rows = json.loads((out / "gpu.json").read_text())["rows"] if done.returncode < 2 else []
    return done.returncode, done.stdout + done.stderr, rows


def test_the_smoke_test_passes_and_prints_one_table_with_every_row(smoke):
    """Exit 0; the table names every check of the four steps, one line per row."""
    code, printed, rows = smoke
    assert code == 0, printed
    names = [row["name"] for row in rows]
    for dtype in ("float16", "float32"):
        kernel_rows = [n for n in names if n.startswith(f"kernel {dtype} ")]
        assert sum(n.startswith(f"kernel {dtype} flash") for n in kernel_rows) == 4, names
        assert sum(n.startswith(f"kernel {dtype} linear") for n in kernel_rows) == 2, names
    assert "kernels bfloat16" in names  # skipped: the interpreter has no bfloat16
    for method in METHODS:
        assert any(n.startswith(f"{method} vs oracle (W=2, gloo") for n in names), names
    assert any(n.startswith("ring overlap") for n in names)
    assert any(n.startswith("speed") for n in names)
    lines = printed.splitlines()
    headers = [line for line in lines if line.split()[:3] == ["check", "result", "figures"]]
    assert len(headers) == 1  # one table
    for row in rows:  # one line each: name, result, figures
        assert any(line.startswith(row["name"]) and f"  {row['result']}  " in line
                   and line.endswith(row["figures"]) for line in lines), row  # fmt: skip


def test_every_correctness_row_passes_and_the_rest_say_why(smoke):
    """Kernel and method rows PASS; bf16 is SKIP, the overlap INFO (CPU), speed "no GPU"."""
    _, printed, rows = smoke
    results = {row["name"]: row["result"] for row in rows}
    for name, result in results.items():
        if name.startswith("kernel ") or " vs oracle " in name:
            assert result == "PASS", (name, printed)
    assert results["kernels bfloat16"] == "SKIP"
    assert next(r for n, r in results.items() if n.startswith("ring overlap")) == "INFO"
    assert next(r for n, r in results.items() if n.startswith("speed")) == "no GPU"
    assert not [r for r in results.values() if r in gpu.FAILING]


def test_the_16_bit_rule_fails_a_result_worse_than_the_baseline_or_not_finite():
    """judge: within factor x the baseline passes; beyond it, NaN, or an overflowed baseline
    fails, and the worst tensor is the one named."""
    truth = {name: torch.ones(100, dtype=torch.float64) for name in ("out", "dq")}
    noise = torch.linspace(-1, 1, 100, dtype=torch.float64)
    baseline = {name: x + 1e-3 * noise for name, x in truth.items()}
    close = {name: x + 1.5e-3 * noise for name, x in truth.items()}
    assert gpu_kernels.judge("c", close, truth, baseline, torch.float16)[1]
    far = dict(close, dq=truth["dq"] + 4e-3 * noise)  # gradients may be 3x, not 4x
    name, ok, _, _ = gpu_kernels.judge("c", far, truth, baseline, torch.float16)
    assert not ok and name == "c [dq]"
    nan = dict(close, out=torch.full((100,), float("nan"), dtype=torch.float64))
    assert not gpu_kernels.judge("c", nan, truth, baseline, torch.float16)[1]
    overflowed = dict(baseline, out=torch.full((100,), float("inf"), dtype=torch.float64))
    assert not gpu_kernels.judge("c", close, truth, overflowed, torch.float16)[1]
    assert not gpu_kernels.judge("c", far, truth, None, torch.float32)[1]  # fixed 1e-5


def test_sptutor_bench_gpu_runs_the_check(monkeypatch):
    """``sptutor bench gpu`` is a choice of ``sptutor bench`` and calls the check's run."""
    calls = []
    monkeypatch.setattr(gpu, "run", lambda out=None, quick=False: calls.append(quick) or 0)
    assert "gpu" in cli.BENCHMARKS
    assert cli.main(["bench", "gpu", "--quick"]) == 0 and calls == [True]


IMPORT_PROBE = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not on the GPU image")
sys.meta_path.insert(0, Refuse())
for module in ("sptutor.bench.gpu", "sptutor.bench.gpu_kernels", "sptutor.bench.gpu_methods",
               "sptutor.bench.kernels", "sptutor.kernels", "sptutor.testing", "triton.testing"):
    __import__(module)
"""


def _imports_without(blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TRITON_INTERPRET": "0"}  # compiled, as on the GPU (no numpy)
    return subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(blocked=blocked)],
                          capture_output=True, text=True, timeout=120, env=environment)  # fmt: skip


def test_the_check_imports_without_rich_hypothesis_matplotlib_pytest_numpy_or_cloudpickle():
    """The GPU image has torch, triton and sptutor only: the check's modules import there
    (cloudpickle, which only sptutor.launch uses, is imported when it first pickles a task)."""
    done = _imports_without(("rich", "hypothesis", "matplotlib", "pytest", "numpy", "cloudpickle"))
    assert done.returncode == 0, done.stderr[-2000:]
