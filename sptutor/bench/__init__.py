"""``sptutor bench``: one module per benchmark, each with a ``run`` the command calls.

- ``kernels``: the Triton kernels against PyTorch's fused attention (GPU).
- ``lasp``: one LASP rank's time per token on the torch backend (CPU).
- ``comm``: bytes sent per rank, the oracle's ledger against ``sptutor.cost`` and the papers.
- ``memory``: bytes kept for backward per rank, against ``sptutor.cost`` and full / W.
- ``balance``: useful work per rank under a causal mask, per layout.
- ``packed``: one packed batch of documents: useful work and bytes per rank, ledger = cost.
- ``timing``: wall time of every method on 1, 2 and 4 gloo processes against one process.

The oracle benchmarks print exact figures and, given a folder, write them as JSON with a picture.
"""

from sptutor.bench.kernels import run_kernels
from sptutor.bench.lasp import run_lasp

__all__ = ["run_kernels", "run_lasp"]
