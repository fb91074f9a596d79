"""check() under torchrun: the same call on the ranks torchrun started (gloo here, NCCL on GPUs),
every rank drawing the same cases and judging them alike; rank 0 prints."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent(
    """
    import dataclasses
    import sys
    import torch.distributed as dist
    from sptutor import torchrun
    from sptutor.testing import Case, check
    from tests.distributed import small_impls

    def raising(q, k, v, *, causal=False, group=None):
        # raises on every rank of a case with W >= 2, before any message
        if dist.get_world_size(group) >= 2:
            raise ValueError("planted: W >= 2")
        return small_impls.ring(q, k, v, causal=causal, group=group)


    if __name__ == "__main__" and sys.argv[1:] == ["raise"]:
        cases = [Case("ring", members, "contiguous", True, 1, 6, 2, 1, 4, "float64", seed=1)
                 for members in ((0,), (0, 1), (0, 1))]
        cases[2] = dataclasses.replace(cases[2], seed=2)
        report = check(raising, method="ring", cases=cases)
        if torchrun.is_first():
            print(report)
            print("statuses", [r.status for r in report.results])
        raise SystemExit(torchrun.finish(0 if report.passed else 1))
    elif __name__ == "__main__":
        bug = sys.argv[1] if len(sys.argv) > 1 else None
        # the seed is random (drawn on rank 0, shared): a planted mistake runs causal cases
        # only, where a masked diagonal shows in every case, so the verdict does not hang on
        # which cases the seed draws
        causal = (True,) if bug else (False, True)
        report = check(small_impls.ring, method="ring", examples=5, seed=None,
                       kwargs={"bug": bug}, causal=causal)
        if torchrun.is_first():
            print(report)
        raise SystemExit(0 if report.passed else 1)
    """
)


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(script), *args]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_check_under_torchrun_passes_a_correct_ring_and_names_a_mistake(tmp_path):
    script = tmp_path / "run_check.py"
    script.write_text(SCRIPT)
    correct = _torchrun(script)
    assert correct.returncode == 0, correct.stdout + correct.stderr
    assert correct.stdout.count("ring matches the ring oracle in all 5 cases") == 1  # rank 0
    wrong = _torchrun(script, "diagonal")
    assert wrong.returncode != 0
    assert "the diagonal is masked" in wrong.stdout, wrong.stdout + wrong.stderr


def test_a_case_that_raises_under_torchrun_is_an_error_and_the_last_one_run(tmp_path):
    """Every rank gathers every rank's outcome, so a raise is one error verdict (the blamed rank
    and its traceback), not a traceback per rank; the group may hold messages the raise left,
    so later cases are not run on it, and said so. Rank 0 prints before any rank exits."""
    script = tmp_path / "run_check.py"
    script.write_text(SCRIPT)
    done = _torchrun(script, "raise")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "statuses ['pass', 'error', 'error']" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count("rank 0 of 2 failed (then rank 1 failed too)") == 1, done.stdout
    assert "ValueError: planted: W >= 2" in done.stdout
    assert "not run: an earlier case raised" in done.stdout
    # no rank's traceback on stderr (torchrun's own, for the exit code 1, names no sptutor file)
    assert "Flaky" not in done.stderr and "sptutor/checker" not in done.stderr, done.stderr
    for rank in (0, 1):  # each raising rank says so at once, in one line
        assert f"rank {rank} raised in ring W=2" in done.stderr, done.stderr


def test_sptutor_check_under_torchrun_prints_its_report_once():
    """``torchrun ... -m sptutor check MODULE:FUNCTION``: every rank runs the sweep, rank 0 alone
    prints the report, and every rank exits 0 after it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "sptutor", "check", "sptutor.ring:ring_attention",
               "--method", "ring", "--examples", "3"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ring_attention matches the ring oracle in all 3 cases") == 1
