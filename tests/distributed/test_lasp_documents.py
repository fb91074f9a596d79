"""Real LASP and LASP-2 with any S and packed documents, on 4 gloo processes == their oracle,
shard by shard and message by message; no state crosses a document, also across ranks."""

import dataclasses

import torch
from hypothesis import Phase, example, given, settings

from tests.distributed.harness import per_group
from tests.distributed.linear_cases import linear_case, linear_document_cases, problems, run_cases

ALL, TRIPLE, PAIR = (0, 1, 2, 3), (1, 2, 3), (2, 3)
DECAY = (0.9, 0.75, 0.6, 0.99)
# hand-picked: S not divisible by W, boundaries inside chunks, at rank edges, one-token
# documents, one document over every rank, several in one chunk, an empty one; 3 dtypes
EXPLICIT = [
    linear_case(method, ALL, True, 2, 11, 4, 2, 5, dtype, 7, DECAY, offsets)
    for method in ("lasp", "lasp2") for dtype in ("float64", "float32", "float16")
    for offsets in ((0, 2, 3, 6, 11), (0, 11), (0, 3, 6, 9, 11), tuple(range(12)))
] + [
    linear_case("lasp2", TRIPLE, True, 1, 7, 2, 1, 3, "float64", 8, None, (0, 1, 2, 4, 4, 5, 7)),
    linear_case("lasp", PAIR, True, 1, 3, 2, 1, 3, "float64", 9, (0.6, 0.7), (0, 1, 3)),
    linear_case("lasp", ALL, False, 1, 10, 2, 1, 3, "float32", 10),
    linear_case("lasp2", TRIPLE, False, 2, 4, 2, 2, 8, "float64", 11),
]  # fmt: skip


def assert_all_match(cases):
    """One launch; every rank of every case matches the oracle and the closed form."""
    for case, per_rank in zip(cases, run_cases(cases)):
        assert not problems(case, per_rank), (case, problems(case, per_rank))


# Tolerances: the design's (sptutor.testing.oracle_tolerance): float64 1e-10, float32 1e-5
# relative to the oracle, float16 one ulp; both sides run the same segment math in the same order.
@settings(max_examples=1, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda m: linear_document_cases("lasp", m) | linear_document_cases("lasp2", m)))
@example(EXPLICIT)
def test_real_lasp_and_lasp2_with_documents_match_the_oracle(cases):
    """W 1..4, any S >= W, documents anywhere, decay, GQA/MQA, float64/32/16: shards, ledger and
    saved bytes equal the oracle's; bytes sent equal sptutor.cost (whatever the documents),
    bytes saved q, k, v plus one state where a chunk reads one."""
    assert_all_match(cases)


def test_documents_are_isolated_on_the_real_ranks_and_bad_calls_raise():
    """Changing one document's q, k, v (here spanning ranks 1..2 of 4) leaves out, dq, dk, dv of
    every other token bit-identical on every rank; non-causal with documents, and an uneven S
    without seq_len, are ValueErrors on every rank; one small triton case matches the oracle."""
    offsets = (0, 2, 5, 9, 12, 13)  # document 2 = [5, 9): ranks 1 and 2 of chunks of 4, 3, 3, 3
    base = [linear_case(m, ALL, True, 1, 13, 2, 1, 4, "float32", 3, (0.9, 0.7), offsets)
            for m in ("lasp", "lasp2")]  # fmt: skip
    altered = [dataclasses.replace(c, altered=(5, 9)) for c in base]
    errors = [
        linear_case("lasp", ALL, False, 1, 8, 2, 1, 3, cu_seqlens=(0, 3, 8)),
        linear_case("lasp2", ALL, True, 1, 10, 2, 1, 3, give_seq_len=False),
    ]
    triton = [linear_case("lasp2", PAIR, True, 1, 7, 2, 1, 4, "float64", 5, (0.9, 0.8),
                         (0, 2, 5, 7), backend="triton")]  # fmt: skip
    cases = base + altered + errors + triton
    results = run_cases(cases)
    outside = torch.ones(13, dtype=torch.bool)
    outside[5:9] = False
    for case, before, after in zip(base, results[:2], results[2:4]):
        for rank in ALL:
            mine = outside[case.positions()[rank]]  # this rank's tokens outside document 2
            for name in ("out", "dq", "dk", "dv"):
                same = torch.equal(before[rank][name][:, mine], after[rank][name][:, mine])
                assert same, (case.method, rank, name)
            if not mine.all():  # the document itself did change
                assert not torch.equal(before[rank]["out"], after[rank]["out"])
    non_causal, no_seq_len = results[4], results[5]
    assert all("need causal=True" in r["error"] for r in non_causal.values())
    assert all("ranks disagree on S" in r["error"] for r in no_seq_len.values())
    assert not problems(triton[0], results[6])
