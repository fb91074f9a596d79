"""The oracle: readable single-process emulations of every sequence-parallel method.

Imported as ``sptutor.oracle``. Each method runs its steps in the same order as the real
multi-process code and logs every message it would send; ``reference`` holds the ground truth.
"""

from sptutor.methods import LINEAR_METHODS, METHODS, SOFTMAX_METHODS
from sptutor.oracle.reference import full_attention, full_linear_attention
from sptutor.oracle.simulation import simulate
from sptutor.oracle.world import RankRecord, Simulation

__all__ = [
    "LINEAR_METHODS",
    "METHODS",
    "SOFTMAX_METHODS",
    "RankRecord",
    "Simulation",
    "full_attention",
    "full_linear_attention",
    "simulate",
]
