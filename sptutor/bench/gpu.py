"""``sptutor bench gpu`` (``bash scripts/gpu_check.sh``): everything a GPU machine can tell, in
one command of under 4 minutes and one table (check, result, figures).

1. The Triton kernels, compiled, against the ground truth in bfloat16, float16 and float32
   (``sptutor.bench.gpu_kernels``).
2. Every method's real code under torchrun, NCCL, one GPU per rank, against the oracle; and the
   ring's step time against its compute alone when there are 2 GPUs or more
   (``sptutor.bench.gpu_methods``, started at once and run beside step 1).
3. The kernels' speed against SDPA's flash backend (``sptutor.bench.kernels``): the goals at
   bf16, S=16k, D=128 first, then the other cases while the time budget lasts.

Without CUDA (or with ``--cpu``) the same command is a smoke test: kernels under the Triton
interpreter at tiny shapes, gloo with W=2, the speed rows "no GPU". Results: PASS, FAIL and
ERROR (a check that crashed) judge correctness and set the exit code; SKIP says what could not
run here; BELOW (a speed goal missed) and INFO never fail. Imports torch, triton and sptutor only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 210.0  # the whole check on one H200; the speed rows take what the others leave
KERNEL_SHARE = 0.6  # the kernel checks start no new check after this share of the budget
GOALS = {"fwd": 0.8, "bwd": 0.6}  # ours / SDPA flash, bf16, S=16k, D=128
FAILING = ("FAIL", "ERROR")


@dataclasses.dataclass
class Row:
    """One line of the table."""

    name: str
    result: str
    figures: str


def _note(text: str) -> None:
    """Progress for the person waiting, on stderr (stdout holds the table alone)."""
    print(f"gpu check: {text}", file=sys.stderr, flush=True)


def choose_device(cpu: bool) -> bool:
    """Set the environment before torch sees CUDA or triton decorates a kernel; True on a GPU.
    ``cpu``: hide the GPUs (smoke test); the kernels are then interpreted, else compiled."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    gpu = torch.cuda.is_available()
    os.environ["TRITON_INTERPRET"] = "0" if gpu else "1"  # read when the kernels are decorated
    return gpu


def kernel_rows(gpu: bool, deadline: float = float("inf")) -> list[Row]:
    """Step 1: one row per kernel check and dtype (bfloat16 skipped on the interpreter); the
    checks not started by ``deadline`` (compiling is most of their time) are one SKIP row."""
    import torch
    import triton

    from sptutor import kernels
    from sptutor.bench import gpu_kernels

    where = torch.cuda.get_device_name() if gpu else "CPU"
    if gpu and kernels.INTERPRETED:
        return [Row("kernels compiled", "FAIL", "the kernels were imported interpreted")]
    how = "compiled" if gpu else "Triton interpreter (smoke test, tiny shapes)"
    rows = [Row("kernels: how they run", "INFO", f"{how}, triton {triton.__version__}, {where}")]
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if gpu else (torch.float16,)
    if not gpu:
        dtypes += (torch.float32,)
        rows.append(Row("kernels bfloat16", "SKIP", "the Triton interpreter has no bfloat16"))
    device = "cuda" if gpu else "cpu"
    checks, late = gpu_kernels.all_checks(dtypes, device, gpu), 0
    for dtype, what, check in checks:
        short = str(dtype).removeprefix("torch.")
        if time.monotonic() > deadline:
            late += 1
            continue
        try:
            name, ok, error, limit = check()
        except Exception as failure:
            rows.append(Row(f"kernel {short} {what}", "ERROR", _one_line(failure)))
            continue
        rule = "fixed" if dtype == torch.float32 else "2x/3x plain torch"
        figures = f"error {error:.1e} <= {limit:.1e} ({rule})"
        rows.append(Row(f"kernel {short} {name}", "PASS" if ok else "FAIL", figures))
    if late:
        rows.append(Row("kernels: the rest", "SKIP", f"{late} of {len(checks)} not run "
                        "(time budget)"))  # fmt: skip
    return rows


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


class Methods:
    """Step 2 in the background: torchrun on every GPU (2 gloo processes on CPU)."""

    def __init__(self, gpu: bool, folder: Path) -> None:
        import torch

        self.world = torch.cuda.device_count() if gpu else 2
        self.rows_file, self.log, self.go = folder / "rows.jsonl", folder / "log", folder / "go"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.world}", "-m", "sptutor.bench.gpu_methods",
                   "--out", str(self.rows_file), "--wait-for", str(self.go)]  # fmt: skip
        environment, self.notes = dict(os.environ), []
        if self.world > 1 and importlib.util.find_spec("numpy") is None:
            # sptutor.agreement compares the ranks' calls with dist.all_gather_object, which
            # unpickles through tensor.numpy(): without numpy it cannot run, so it is turned off
            environment["SPTUTOR_CHECK_RANKS"] = "0"
            why = "off: no numpy here, and dist.all_gather_object needs it"
            self.notes.append(Row("rank agreement check (sptutor.agreement)", "SKIP", why))
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=environment, start_new_session=True)  # fmt: skip

    def gpu_free(self) -> None:
        """Tell the ranks the parent's GPU work is done: they may time now."""
        self.go.touch()

    def rows(self, timeout: float) -> list[Row]:
        """Wait (``timeout`` s at most; then end the launch) and read its rows; a method that
        did not report is a FAIL row with the launch's last line."""
        from sptutor.methods import METHODS

        try:
            code = self.process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)  # the launch this check started, its own group
            code = f"killed after {time.monotonic() - self.started:.0f} s"
        found = list(self.notes)
        if self.rows_file.exists():
            found += [Row(**json.loads(line)) for line in self.rows_file.read_text().splitlines()]
        lines = [line for line in self.log.read_text().splitlines() if line.strip()]
        last = lines[-1][:160] if lines else "no output"
        for method in METHODS:
            if not any(row.name.startswith(f"{method} vs oracle") for row in found):
                found.append(Row(f"{method} vs oracle", "FAIL",
                                 f"did not report (torchrun: {code}; {last})"))  # fmt: skip
        if not any(row.name.startswith("ring overlap") for row in found):
            found.append(Row("ring overlap", "ERROR", f"did not report (torchrun: {code})"))
        return found


def speed_rows(gpu: bool, deadline: float, quick: bool) -> list[Row]:
    """Step 3: the goal rows (bf16, S=16k, D=128, full and causal), then one row per other case
    of ``sptutor bench kernels`` while time is left before ``deadline``."""
    if not gpu:
        return [Row("speed vs SDPA flash (bf16, S=16k, D=128)", "no GPU",
                    "nothing to time: the interpreter says nothing about speed")]  # fmt: skip
    import torch

    from sptutor.bench import kernels as bench

    every = bench.cases(quick)
    goal_cases = [c for c in every if (c.seq_len, c.head_dim, c.heads_kv) == (16384, 128, 16)]
    rows, ratios, skipped = [], {"fwd": {}, "bwd": {}}, 0
    for case in goal_cases + [c for c in every if c not in goal_cases]:
        if case not in goal_cases and time.monotonic() > deadline:
            skipped += 1
            continue
        try:
            timing = bench.time_case(case, torch.bfloat16)
        except Exception as failure:
            rows.append(Row(f"speed {case}", "ERROR", _one_line(failure)))
            continue
        ours_fwd, sdpa_fwd, ours_bwd, sdpa_bwd = timing.tflops(case)
        if case in goal_cases:
            kind = "causal" if case.causal else "full"
            ratios["fwd"][kind] = (ours_fwd / sdpa_fwd, ours_fwd, sdpa_fwd, timing.sdpa)
            ratios["bwd"][kind] = (ours_bwd / sdpa_bwd, ours_bwd, sdpa_bwd, timing.sdpa)
            continue
        rows.append(Row(f"speed {case}", "INFO",
                        f"TFLOP/s fwd {ours_fwd:.0f} vs {sdpa_fwd:.0f} ({ours_fwd / sdpa_fwd:.2f}),"
                        f" bwd {ours_bwd:.0f} vs {sdpa_bwd:.0f} ({ours_bwd / sdpa_bwd:.2f}),"
                        f" sdpa {timing.sdpa}"))  # fmt: skip
    goal_rows = []
    for phase, goal in GOALS.items():
        found = ratios[phase]
        name = f"speed {phase} ours/SDPA (bf16, S=16k, D=128)"
        if not found:
            goal_rows.append(Row(name, "ERROR", "not measured"))
            continue
        text = ", ".join(f"{kind} {r:.2f} ({ours:.0f} vs {sdpa:.0f} TFLOP/s, sdpa {how})"
                         for kind, (r, ours, sdpa, how) in found.items())  # fmt: skip
        worst = min(r for r, *_ in found.values())
        goal_rows.append(Row(name, "PASS" if worst >= goal else "BELOW", f"{text}; goal >= {goal}"))
    if skipped:
        rows.append(Row("speed: other cases", "SKIP", f"{skipped} not timed (time budget)"))
    return goal_rows + rows


def table(rows: list[Row]) -> str:
    """The rows as one plain-text table (no rich: the GPU image may not have it)."""
    width = max(len("check"), *(len(row.name) for row in rows))
    lines = [f"{'check':<{width}}  {'result':<6}  figures", f"{'-' * width}  {'-' * 6}  {'-' * 7}"]
    lines += [f"{row.name:<{width}}  {row.result:<6}  {row.figures}" for row in rows]
    return "\n".join(lines)


def check(cpu: bool = False, quick: bool = False, budget: float = BUDGET_S) -> list[Row]:
    """Run every step and return the rows (no printing but progress on stderr)."""
    start = time.monotonic()
    gpu = choose_device(cpu)
    with tempfile.TemporaryDirectory(prefix="sptutor-gpu-") as folder:
        methods = Methods(gpu, Path(folder))
        try:
            _note(f"torchrun started on {methods.world} ranks; kernels against the truth")
            try:
                rows = kernel_rows(gpu, deadline=start + KERNEL_SHARE * budget)
            except Exception as failure:  # e.g. no numpy for the interpreter: the rest still runs
                rows = [Row("kernels", "ERROR", _one_line(failure))]
            methods.gpu_free()
            _note("waiting for the methods under torchrun")
            rows += methods.rows(timeout=start + budget - time.monotonic())
        finally:
            if methods.process.poll() is None:
                os.killpg(methods.process.pid, 9)
    _note("timing the kernels")
    rows += speed_rows(gpu, start + budget - 15, quick)
    _note(f"done in {time.monotonic() - start:.0f} s")
    return rows


def run(out: Path | None = None, quick: bool = False, cpu: bool = False) -> int:
    """Print the table (and write ``out/gpu.json``); exit code 1 if a correctness row failed."""
    start = time.monotonic()
    rows = check(cpu=cpu, quick=quick)
    import torch

    import sptutor

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (smoke test)"
    print(f"sptutor {sptutor.__version__} GPU check: {where}, torch {torch.__version__}")
    print(table(rows))
    failed = [row for row in rows if row.result in FAILING]
    seconds = time.monotonic() - start
    print(f"{len(failed)} of {len(rows)} rows failed" if failed else "every correctness row passed",
          f"({seconds:.0f} s)")  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        figures = dict(device=where, torch=torch.__version__, seconds=round(seconds, 1),
                       rows=[dataclasses.asdict(row) for row in rows])  # fmt: skip
        (out / "gpu.json").write_text(json.dumps(figures, indent=1) + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sptutor.bench.gpu [--cpu] [--quick] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m sptutor.bench.gpu", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cpu", action="store_true", help="smoke test: hide any GPU")
    parser.add_argument("--quick", action="store_true", help="fewer speed cases")
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write DIR/gpu.json")
    args = parser.parse_args(argv)
    return run(out=args.out, quick=args.quick, cpu=args.cpu)


if __name__ == "__main__":
    raise SystemExit(main())
