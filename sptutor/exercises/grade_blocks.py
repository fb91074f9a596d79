"""Grading chapter 0's exercise: the learner's ``merge`` and ``attention_block_backward``
against sptutor's own (``sptutor.blocks``), on seeded inputs that cut the keys into two blocks.

The cases cover causal and not, GQA, odd head dims, and a block that some rows do not see at all
(the LSE of -inf that ``merge`` must weigh as zero).
"""

from __future__ import annotations

import traceback

import torch

from sptutor import blocks
from sptutor.checker.cases import Case, random_inputs
from sptutor.checker.compare import RankVerdict
from sptutor.checker.report import CaseResult, Report
from sptutor.tolerances import relative_error, tolerance

# (B, S, Hq, Hkv, D, causal): S keys cut into two blocks of S/2
SHAPES = [(1, 4, 1, 1, 4, False), (1, 4, 1, 1, 4, True), (2, 8, 4, 2, 5, True),
          (1, 6, 2, 1, 8, False), (2, 8, 2, 2, 3, True), (1, 16, 4, 1, 16, True)]  # fmt: skip


def grade_blocks(module, *, examples: int = 6, seed: int | None = 0) -> Report:
    """A report over the first ``examples`` shapes: the merge checked through ``out`` and
    ``lse``, the backward through ``dq``, ``dk``, ``dv`` (float64, tolerance 1e-10)."""
    results = []
    for index, shape in enumerate(SHAPES[:examples]):
        case = Case("blocks", (0,), "contiguous", shape[5], *shape[:5], seed=(seed or 0) + index)
        try:
            errors = _errors(module, case)
        except Exception:
            results.append(
                CaseResult(case, "error", error=f"rank 0 failed:\n{traceback.format_exc()}")
            )
            continue
        limit = tolerance(torch.float64)
        verdict = RankVerdict(0, errors, dict.fromkeys(errors, limit), [], [])
        status = "pass" if verdict.passed else "fail"
        function = {"out": "merge", "lse": "merge"}
        sentences = [f"{function.get(name, 'attention_block_backward')}: {name} wrong (error "
                     f"{errors[name]:.1e})" for name in verdict.wrong]  # fmt: skip
        results.append(CaseResult(case, status, [verdict], diagnosis=sentences))
    failing = [r for r in results if not r.passed]
    return Report("blocks.py", "blocks", results, failing[0] if failing else None)


def _errors(module, case: Case) -> dict[str, float]:
    """Relative errors of the learner's merge (out, lse) and block backward (dq, dk, dv)."""
    q, k, v, dout = random_inputs(case.batch, case.seq_len, case.heads_q, case.heads_kv,
                                  case.head_dim, seed=case.seed)  # fmt: skip
    positions = torch.arange(case.seq_len)
    half = case.seq_len // 2
    scale = case.head_dim**-0.5
    parts = []
    for keys in (slice(half, None), slice(0, half)):  # the later block first: rows see none of it
        parts.append(blocks.attention_block(q, k[:, keys], v[:, keys], positions,
                                            positions[keys], case.causal, scale))  # fmt: skip
    expected = blocks.merge(*parts[0], *parts[1])
    mine = module.merge(*parts[0], *parts[1])
    out, lse = expected
    errors = {"out": relative_error(mine[0], out), "lse": relative_error(mine[1], lse)}
    arguments = (dout, q, k[:, :half], v[:, :half], out, lse, positions, positions[:half],
                 case.causal, scale)  # fmt: skip
    theirs = blocks.attention_block_backward(*arguments)
    yours = module.attention_block_backward(*arguments)
    for name, a, b in zip(("dq", "dk", "dv"), yours, theirs):
        errors[name] = relative_error(a, b)
    return errors
