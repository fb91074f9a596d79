"""The exercises' grader: solutions pass, blanks report their TODO, and each planted mistake is
explained in one sentence of the right category (the solution's source with one line changed).

One launch of four processes serves the cases that do not break it; a blank or a deadlock ends
its launch, as any failure does, and the grader goes on in a fresh one."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.grade_samples import MISTAKES, planted
from sptutor import launch
from sptutor.exercises import blank
from sptutor.exercises.grade import grade
from sptutor.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 8


@pytest.fixture(scope="module")
def pool():
    with launch.Pool(4, timeout=120.0) as running:
        yield running


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("method", METHODS)
def test_the_solution_passes_and_so_does_its_emulated_twin(tmp_path, pool, method):
    real = _write(tmp_path, method, (ROOT / "sptutor" / f"{method}.py").read_text())
    graded = grade(real, examples=EXAMPLES, pool=pool)
    assert graded.passed, str(graded)
    emulated = _write(tmp_path, f"oracle_{method}", (ROOT / "oracle" / f"{method}.py").read_text())
    assert grade(emulated, examples=EXAMPLES).passed


@pytest.mark.parametrize("method", METHODS)
def test_a_blank_reports_its_first_todo(tmp_path, method):
    graded = grade(_write(tmp_path, method, blank(method)), examples=EXAMPLES)
    assert graded.category == "TODO left", str(graded)
    assert graded.sentence.startswith(f"TODO: {method}"), graded.sentence
    emulated = grade(_write(tmp_path, f"oracle_{method}", blank(f"oracle_{method}")))
    assert emulated.category == "TODO left" and not emulated.passed


RING = (ROOT / "sptutor" / "ring.py").read_text()


@pytest.mark.parametrize(("name", "method", "patch", "category", "words"), MISTAKES,
                         ids=[m[0] for m in MISTAKES])  # fmt: skip
def test_a_planted_mistake_is_explained_in_one_sentence(tmp_path, pool, name, method, patch,
                                                        category, words):  # fmt: skip
    source = planted(method, *patch)
    graded = grade(_write(tmp_path, method, source), examples=20, pool=pool)
    assert not graded.passed
    assert graded.category == category, str(graded)
    assert words in graded.sentence, graded.sentence


def test_a_deadlock_says_where_each_rank_waits_and_ends_in_time(tmp_path):
    forward = RING.split("def _backward")[0]
    stuck = forward.replace("if step < W - 1:", "if step < W - 1 and rank != 0:")
    path = _write(tmp_path, "ring", RING.replace(forward, stuck))
    started = time.monotonic()
    graded = grade(path, examples=4, stall_timeout=4.0)
    assert time.monotonic() - started < 30  # the stall ends it; nothing waits for a timeout
    assert graded.category == "deadlock", str(graded)
    # rank 0 never sends in forward: rank 1 waits for rank 0 (which of rank 1's transfers
    # hangs depends on what rank 0 sends later, in backward, that rank 1 takes instead)
    assert re.search(r"rank 1 waits (to receive from|for its send to) rank 0 at", graded.sentence)


def test_the_command_line_and_torchrun_grade_alike(tmp_path):
    solution = _write(tmp_path, "ring", RING)
    grade_it = [sys.executable, "-m", "sptutor", "grade", str(solution), "--world", "2",
                "--examples", "4"]  # fmt: skip
    done = subprocess.run(grade_it, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ring.py: every case passes" in done.stdout, done.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "sptutor.grade", str(solution),
                "--examples", "4"]  # fmt: skip
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ring.py: every case passes") == 1  # rank 0 prints
    (tmp_path / "blank").mkdir()
    blanked = _write(tmp_path / "blank", "ring", blank("ring"))
    done = subprocess.run([*grade_it[:4], str(blanked), *grade_it[5:]], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "TODO: ring forward" in done.stdout
    # under torchrun the blank's NotImplementedError is the same verdict, printed once by rank 0
    # (every rank gathers every rank's outcome; none dies on its own traceback)
    done = subprocess.run([*torchrun[:8], str(blanked), *torchrun[9:]], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count("ring.py: TODO left: TODO: ring forward") == 1, done.stdout
    assert "Flaky" not in done.stderr, done.stderr


@pytest.mark.parametrize("method", METHODS)
def test_each_region_left_blank_is_reported_by_its_name(tmp_path, method):
    """The emulated twin with one region blanked at a time (in process: no launch per region);
    the real ring likewise, on processes."""
    from sptutor.exercises import markers

    def graded(side: str, stem: str, region):
        source = (ROOT / side / f"{method}.py").read_text()
        text = markers.blank(source, [region])
        folder = tmp_path / f"{stem}-{region.name.replace(' ', '-')}"
        folder.mkdir()
        return grade(_write(folder, stem, text), examples=4)

    oracle_source = (ROOT / "oracle" / f"{method}.py").read_text()
    for region in markers.parse(oracle_source, f"oracle/{method}.py"):
        result = graded("oracle", f"oracle_{method}", region)
        assert result.category == "TODO left", str(result)
        assert result.sentence.startswith(f"TODO: {region.name}:"), result.sentence
    if method == "ring":
        for region in markers.parse(RING, "sptutor/ring.py"):
            result = graded("sptutor", "ring", region)
            assert result.sentence.startswith(f"TODO: {region.name}:"), result.sentence
