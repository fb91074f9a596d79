"""sptutor as the correctness oracle for your own sequence-parallel attention.

``check(fn, method="ring")`` runs your per-rank function over a sweep of cases in one launch and
compares every rank's output, LSE and gradients with the oracle's; its report gives a verdict per
case, and for the smallest failing case says which ranks, tensors, rows and heads are wrong and
which common mistake the wrong tensor matches. Messages and saved-for-backward bytes are
compared too, as information. ``sptutor.testing`` re-exports the names below.
"""

from sptutor.checker.adapter import Adapter, Context
from sptutor.checker.cases import Case, Sweep, random_inputs
from sptutor.checker.report import CaseResult, Report
from sptutor.checker.sweep import check, check_sptutor

__all__ = [
    "Adapter",
    "Case",
    "CaseResult",
    "Context",
    "Report",
    "Sweep",
    "check",
    "check_sptutor",
    "random_inputs",
]
