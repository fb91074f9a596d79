"""The real code skips a block its mask hides entirely (``blocks.any_visible``: causal, or packed
documents that share nothing): each rank computes exactly the blocks the oracle logs compute
for, fewer than without the mask under the contiguous layout or with documents, and its shards
still match the oracle. One launch of 4 gloo processes checks ring, usp, lss and rsa."""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.distributed as dist

import sptutor
from sptutor import backends, launch, oracle
from sptutor.testing import Case, compare_with_oracle, run_case
from tests.distributed import harness

ALL, TRIO, PAIR = (0, 1, 2, 3), (1, 2, 3), (2, 3)
# contiguous + causal hides every later rank's block from an earlier rank; zigzag hides none
CASES = [
    Case("ring", ALL, "contiguous", True, 1, 16, 4, 2, 8, "float64", seed=1),
    Case("ring", TRIO, "contiguous", True, 2, 9, 2, 1, 5, "float32", seed=2),
    Case("ring", ALL, "contiguous", True, 1, 8, 2, 2, 8, "float16", seed=3),
    Case("ring", ALL, "zigzag", True, 1, 16, 2, 1, 8, "float64", seed=4),
    Case("lss", ALL, "contiguous", True, 1, 16, 4, 2, 8, "float64", seed=5),
    Case("lss", PAIR, "contiguous", True, 1, 6, 2, 1, 3, "float32", seed=6),
    Case("rsa", ALL, "contiguous", True, 1, 16, 4, 2, 8, "float64", seed=7),
    Case("rsa", TRIO, "contiguous", True, 1, 9, 2, 2, 5, "float32", seed=8),
    Case("usp", ALL, "contiguous", True, 1, 16, 4, 2, 8, "float64", seed=9, ulysses=2),
    Case("usp", ALL, "contiguous", True, 1, 16, 2, 1, 8, "float32", seed=10, ulysses=1),
]
# packed documents: zigzag hides nothing causally, but rank 3's tokens 6..9 (document 1) see
# nothing of rank 0's block (0, 1 in document 0; 14, 15 later); uneven S (13, 11) too
PACKED = (0, 6, 16)
CASES += [
    Case("ring", ALL, "zigzag", True, 1, 16, 2, 1, 8, "float64", seed=11, cu_seqlens=PACKED),
    Case("ring", TRIO, "contiguous", False, 1, 13, 2, 1, 4, "float32", seed=12,
         cu_seqlens=(0, 5, 13)),
    Case("lss", ALL, "zigzag", True, 1, 16, 2, 1, 8, "float64", seed=13, cu_seqlens=PACKED),
    Case("rsa", ALL, "zigzag", True, 1, 16, 2, 2, 8, "float64", seed=14, cu_seqlens=PACKED),
    # usp's ring rank 1 (tokens 4..11, all of document 1) sees nothing of ring rank 0's block
    Case("usp", ALL, "zigzag", True, 1, 16, 4, 2, 8, "float64", seed=15, ulysses=2,
         cu_seqlens=(0, 4, 16)),
    Case("usp", ALL, "contiguous", False, 1, 11, 4, 2, 4, "float64", seed=16, ulysses=2,
         cu_seqlens=(0, 6, 11)),
]  # fmt: skip


def _count_calls(module, name: str, tally: collections.Counter, key: str) -> None:
    """Replace ``module.name`` by a wrapper that adds 1 to ``tally[key]`` per call."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        tally[key] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _block_primitive(case: Case) -> str:
    """What one block computation calls: the backend's block functions, or for RSA, which
    computes its score and value blocks on torch, one einsum per block product."""
    return "einsum" if case.method == "rsa" else "backends"


def _run_counting_blocks(rank: int, world: int, cases: list[Case]) -> list[dict | None]:
    """Body of each process: harness.run_on_rank, each case first run once more counting the
    block computations of its forward and of its backward (``result["blocks"]``)."""
    tally = collections.Counter()
    _count_calls(backends, "attention_forward", tally, "backends")
    _count_calls(backends, "attention_backward", tally, "backends")
    _count_calls(torch, "einsum", tally, "einsum")

    def counted_run_case(case, group, mesh=None):
        q, k, v, dout = case.shards(dist.get_rank(group))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        attention = getattr(sptutor, f"{case.method}_attention")
        primitive = _block_primitive(case)
        start = tally[primitive]
        out = attention(q, k, v, **case.options(group, mesh))
        forward = tally[primitive] - start
        out.backward(dout)
        backward = tally[primitive] - start - forward
        return run_case(case, group, mesh=mesh) | {"blocks": (forward, backward)}

    harness.run_case = counted_run_case  # this process only: it ends with the launch
    return harness.run_on_rank(rank, world, cases)


def _oracle_blocks(case: Case) -> list[tuple[int, int]]:
    """Per group rank: the oracle's compute events with useful work, forward and backward."""
    q, k, v, dout = case.inputs()
    sim = oracle.simulate(
        case.method, q, k, v, dout, world=len(case.members), causal=case.causal,
        layout=case.layout, ulysses=case.ulysses, cu_seqlens=case.cu_seqlens_tensor(),
    )  # fmt: skip
    computed = collections.Counter(
        (e.rank, e.phase) for e in sim.ledger.events if e.op == "compute" and e.macs > 0
    )
    return [(computed[r, "forward"], computed[r, "backward"]) for r in range(len(case.members))]


def assert_masked_blocks_skipped(results: list[list[dict | None]]) -> None:
    """Every case: block computations per rank == the oracle's; fewer than without the mask
    when contiguous causal or packed (the same when zigzag with one document); shards, ledger
    and saved bytes match the oracle."""
    for index, case in enumerate(CASES):
        per_rank = {rank: results[rank][index] for rank in case.members}
        measured = [per_rank[rank]["blocks"] for rank in case.members]
        assert measured == _oracle_blocks(case), f"{case}: blocks computed {measured}"
        unmasked = _oracle_blocks(dataclasses.replace(case, causal=False, cu_seqlens=None))
        fewer = sum(f for f, _ in measured) < sum(f for f, _ in unmasked)
        hidden = (case.layout == "contiguous" and case.causal) or case.cu_seqlens is not None
        assert fewer == hidden, f"{case}: {measured} vs {unmasked}"
        comparisons = compare_with_oracle(case, per_rank)
        problems = [p for c in comparisons for p in c.problems(getattr(torch, case.dtype))]
        assert not problems, f"{case}: {problems}"


def test_fully_masked_blocks_are_skipped_and_results_still_match_the_oracle():
    """Each rank computes only the blocks its causal mask does not hide, as the oracle does."""
    # ring, usp (U=1, 2), lss, rsa on W=2..4: contiguous causal (later blocks hidden), zigzag
    # causal (none hidden); per rank and phase, block computations == the oracle's compute
    # events, fewer than unmasked exactly when a block is hidden; shards == the oracle's
    # tolerances: the harness's (sptutor.testing.oracle_tolerance), as for every real method
    assert_masked_blocks_skipped(launch.spawn(_run_counting_blocks, harness.LAUNCH_WORLD, (CASES,)))
