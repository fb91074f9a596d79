"""The oracle: readable single-process emulations of every sequence-parallel method.

Imported as ``sptutor.oracle``. Each method runs its steps in the same order as the real
multi-process code and logs every message it would send; ``reference`` holds the ground truth.
"""

from sptutor.oracle.reference import full_attention, full_linear_attention

__all__ = ["full_attention", "full_linear_attention"]
