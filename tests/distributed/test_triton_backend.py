"""backend="triton": the methods run end to end on our Triton kernels (under the interpreter on
CPU, so at tiny sizes) and still match the oracle shard by shard and message by message."""

from sptutor.testing import Case
from tests.distributed.harness import assert_real_matches_oracle

ALL, PAIR = (0, 1, 2, 3), (2, 3)
# the kernels compute float64 in float64 and float32 with exact products: the design's tolerances,
# 1e-10 and 1e-5 relative to the oracle hold (measured ~1e-16 and ~3e-7)
CASES = [
    Case("ring", ALL, "zigzag", True, 1, 16, 2, 1, 8, "float64", seed=1, backend="triton"),
    Case("ring", PAIR, "striped", False, 1, 6, 2, 2, 5, "float32", seed=2, backend="triton"),
    Case("usp", ALL, "zigzag", True, 1, 16, 2, 2, 8, "float32", seed=3, ulysses=2,
         backend="triton"),
    Case("ulysses", PAIR, "contiguous", True, 1, 8, 2, 1, 8, "float64", seed=4, backend="triton"),
    Case("lss", PAIR, "zigzag", True, 1, 8, 2, 1, 8, "float64", seed=5, backend="triton"),
    Case("lasp", ALL, "contiguous", True, 1, 12, 2, 1, 8, "float64", seed=6,
         decay=(0.9, 0.8), backend="triton"),
    Case("lasp2", PAIR, "contiguous", True, 1, 6, 2, 2, 4, "float32", seed=7,
         decay=(0.95, 0.7), backend="triton"),
    # packed documents (document ids reach the kernels) and uneven shards
    Case("ring", ALL, "zigzag", True, 1, 18, 2, 1, 8, "float64", seed=8, backend="triton",
         cu_seqlens=(0, 3, 9, 18)),
    Case("ulysses", PAIR, "contiguous", False, 1, 7, 2, 1, 4, "float32", seed=9,
         backend="triton", cu_seqlens=(0, 4, 7)),
    Case("lasp", ALL, "contiguous", True, 1, 13, 2, 1, 4, "float64", seed=10,
         decay=(0.9, 0.8), backend="triton", cu_seqlens=(0, 5, 6, 13)),
]  # fmt: skip


def test_methods_on_the_triton_backend_match_the_oracle():
    """ring, usp, ulysses, lss, lasp, lasp2 on Triton kernels == oracle (shards, ledger, bytes),
    with packed documents and uneven shards too."""
    assert_real_matches_oracle(CASES)
