"""Hypothesis profiles: derandomized in CI (reproducible), random exploration locally.

Without CUDA, the Triton kernels (sptutor.kernels) run under the Triton interpreter. Triton reads
TRITON_INTERPRET when @triton.jit decorates a kernel, so it is set here, before any test module
imports them (sptutor.kernels does the same on import; this makes the choice explicit).

Tests use tiny tensors, where torch's intra-op threads cost more than they save (10x slower on a
loaded 2-core machine): one thread (spawned ranks set the same in sptutor.launch).
"""

import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

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
