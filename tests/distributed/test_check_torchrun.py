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
    import sys
    from sptutor import torchrun
    from sptutor.testing import check
    from tests.distributed import small_impls

    if __name__ == "__main__":
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
