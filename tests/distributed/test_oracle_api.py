"""The oracle API for other implementations (README): run_case + compare_with_oracle tell a
correct ring from one with a planted bug, per rank."""

import torch

import sptutor
from sptutor import launch
from sptutor.testing import Case, compare_with_oracle, run_case

# backend "torch": the oracle's own block math, so a rank the bug does not reach matches the
# oracle bit for bit ("auto" on CPU is torch's fused kernel, equal only to roundoff)
CASE = Case("ring", (0, 1, 2, 3), "zigzag", True, batch=1, seq_len=32, heads_q=4, heads_kv=2,
            head_dim=16, backend="torch")  # fmt: skip


def off_by_a_little(q, k, v, **options):
    """Someone's ring attention whose output is 0.1% too large on rank 3."""
    result = sptutor.ring_attention(q, k, v, **options)
    if torch.distributed.get_rank() != 3:
        return result
    if options.get("return_lse"):
        return result[0] * 1.001, result[1]
    return result * 1.001


def _both(rank, world):
    return run_case(CASE, None), run_case(CASE, None, attention=off_by_a_little)


def test_compare_with_oracle_accepts_a_correct_ring_and_finds_the_bug_in_another():
    """The real ring passes on every rank; the planted error shows in rank 3's output, and in the
    other ranks' dK, dV, which rank 3's too-large gradients reach through the backward ring."""
    results = launch.spawn(_both, 4)
    correct = compare_with_oracle(CASE, {rank: pair[0] for rank, pair in enumerate(results)})
    buggy = compare_with_oracle(CASE, {rank: pair[1] for rank, pair in enumerate(results)})
    assert all(not c.problems(torch.float64) for c in correct)
    assert [c.errors["out"] == 0 for c in buggy] == [True, True, True, False]
    assert abs(buggy[3].errors["out"] - 1e-3) < 1e-9  # exactly the planted 0.1%
    assert all(c.errors["dk"] > 1e-6 and c.ledger_match for c in buggy)
