"""Importing sptutor.kernels without CUDA chooses the Triton interpreter for the whole process,
says so once, and never overrides a user's own choice."""

import os
import subprocess
import sys

import pytest
import torch


def test_the_interpreter_is_chosen_once_with_a_warning_and_a_users_choice_is_kept():
    """Without CUDA, importing sptutor.kernels sets TRITON_INTERPRET=1 for the whole process and
    warns once; a value the user set (0 here) is kept and nothing is said."""
    script = ("import os, warnings; warnings.simplefilter('always'); import sptutor.kernels; "
              "print('TRITON_INTERPRET=' + os.environ['TRITON_INTERPRET'])")  # fmt: skip
    outcomes = {}
    for preset in (None, "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if preset is not None:
            env["TRITON_INTERPRET"] = preset
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        outcomes[preset] = (done.stdout.strip(), done.stderr.count("for this whole process"))
    if torch.cuda.is_available():
        pytest.skip("with CUDA the variable is never set")
    assert outcomes == {None: ("TRITON_INTERPRET=1", 1), "0": ("TRITON_INTERPRET=0", 0)}
