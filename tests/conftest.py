"""Hypothesis profiles: derandomized in CI (reproducible), random exploration locally.

Without CUDA, the Triton kernels (sptutor.kernels) run under the Triton interpreter. Triton reads
TRITON_INTERPRET when @triton.jit decorates a kernel, so it is set here, before any test module
imports them (sptutor.kernels does the same on import; this makes the choice explicit).

Tests use tiny tensors, where torch's intra-op threads cost more than they save (10x slower on a
loaded 2-core machine): one thread (spawned ranks set the same in sptutor.launch).
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
os.environ.setdefault("SPTUTOR_CHECK_FINITE", "1")  # NaN/inf inputs are errors (spawned ranks too)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# pytest's default norecursedirs once skipped a folder named tests/dist without a word; every
# folder listed here must contribute tests to a run of the whole suite.
MUST_COLLECT = ("tests/distributed", "tests/peers")


def _whole_suite(config: pytest.Config) -> bool:
    """Was the run asked for everything (no paths, -k, -m, --lf, --deselect or --ignore)?"""
    option = config.option
    if option.keyword or option.markexpr or getattr(option, "lf", False):
        return False
    if any(getattr(option, name, None) for name in ("deselect", "ignore", "ignore_glob")):
        return False
    root = Path(config.rootpath)
    named = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return all(path in (root, root / "tests") for path in named)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail a whole-suite run that collected nothing from a folder of MUST_COLLECT."""
    if not _whole_suite(session.config):
        return
    root = Path(session.config.rootpath)
    collected = {Path(item.path).resolve() for item in session.items}
    for folder in MUST_COLLECT:
        if not any((root / folder) in path.parents for path in collected):
            raise pytest.UsageError(
                f"the whole suite collected no test from {folder}/: check norecursedirs "
                "and testpaths (pytest skips some folder names, e.g. dist, by default)"
            )
