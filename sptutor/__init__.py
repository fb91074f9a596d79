"""sptutor: sequence parallelism for attention, written twice (oracle and real code).

The real per-rank methods live here (one call per rank, inside ``torchrun`` or
``sptutor.launch.spawn``); the oracle is ``sptutor.oracle``.
"""

from sptutor import launch, layout, ledger
from sptutor.lasp import lasp_attention
from sptutor.lasp2 import lasp2_attention
from sptutor.lss import lss_attention
from sptutor.mesh import make_usp_mesh
from sptutor.ring import ring_attention
from sptutor.rsa import rsa_attention
from sptutor.ulysses import ulysses_attention
from sptutor.usp import usp_attention

__version__ = "0.1.0"

__all__ = [
    "lasp2_attention",
    "lasp_attention",
    "launch",
    "layout",
    "ledger",
    "lss_attention",
    "make_usp_mesh",
    "ring_attention",
    "rsa_attention",
    "ulysses_attention",
    "usp_attention",
]
