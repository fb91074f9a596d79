"""sptutor: sequence parallelism for attention, written twice (oracle and real code).

The real per-rank methods live here (one call per rank, inside ``torchrun`` or
``sptutor.launch.spawn``); the oracle is ``sptutor.oracle``.
"""

from sptutor import launch, layout, ledger
from sptutor.mesh import make_usp_mesh
from sptutor.ring import ring_attention

__version__ = "0.1.0"

__all__ = ["launch", "layout", "ledger", "make_usp_mesh", "ring_attention"]
