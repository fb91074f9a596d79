"""check() on code written elsewhere: a small ring and a small Ulysses on plain torch.distributed
(tests/distributed/small_impls.py). Every correct variant passes in float32 and float64 with no
false alarm; every planted mistake fails with the sentence that names it. One launch of four
processes serves the whole file (check's ``pool``)."""

import re

import pytest
import torch
import torch.distributed as dist

from sptutor import launch
from sptutor.testing import Case, check, check_sptutor
from tests.distributed import small_impls

EXAMPLES = 12  # cases drawn per check: W 1..4, causal or not, GQA, odd D, both dtypes
BOTH = ("float32", "float64")


@pytest.fixture(scope="module")
def pool():
    with launch.Pool(4, timeout=60.0) as running:
        yield running


CORRECT = [
    ("ring", small_impls.ring, {}),
    ("ring", small_impls.ring_bhsd, {"tensor_layout": "bhsd"}),
    ("ring", small_impls.ring_forward_only, {"backward": False}),
    ("ulysses", small_impls.ulysses, {"causal_keyword": "is_causal"}),
]


@pytest.mark.parametrize(
    ("method", "fn", "options"), CORRECT, ids=lambda x: getattr(x, "__name__", "")
)
def test_a_correct_implementation_passes_in_float32_and_float64(pool, method, fn, options):
    report = check(fn, method=method, examples=EXAMPLES, dtypes=BOTH, pool=pool, **options)
    assert report.passed, str(report)
    dtypes = {r.case.dtype for r in report.results}
    assert dtypes == set(BOTH), dtypes  # the sweep really drew both
    assert {r.case.world for r in report.results} >= {1, 4}
    assert "matches the" in report.verdict()


BUGS = [
    ("no-rescale", "only the last block it received", "out"),
    ("wrong-peer", "travel the ring the wrong way", "out"),
    ("diagonal", "the diagonal is masked", "out"),
    ("swap-dkdv", "dK and dV are swapped", "dk"),
    ("sum-dkdv", "it holds dk + dv", "dk"),
    ("zero-lse", "lse wrong on every row and head", "lse"),
    ("no-grad", "out does not require grad", None),
]


@pytest.mark.parametrize(("bug", "sentence", "tensor"), BUGS, ids=[b[0] for b in BUGS])
def test_a_planted_mistake_is_named(pool, bug, sentence, tensor):
    report = check(small_impls.ring, method="ring", examples=EXAMPLES, kwargs={"bug": bug},
                   pool=pool)  # fmt: skip
    assert not report.passed
    smallest = report.smallest
    assert smallest is not None and smallest.status == "fail"
    text = str(report)
    assert sentence in text, text
    if tensor is not None:
        assert any(tensor in v.wrong for v in smallest.verdicts), text
    # the smallest failing case is no larger than any failing case the sweep found
    failing = [r for r in report.results if not r.passed and not r.shrinking]
    assert all(smallest.case.seq_len <= r.case.seq_len for r in failing)
    assert "cases=[case]" in report.reproducer
    assert "from tests.distributed.small_impls import ring" in report.reproducer
    compile(report.reproducer, "reproducer.py", "exec")  # valid Python


def test_packed_documents_pass_and_ignoring_them_is_named(pool):
    """With documents in the sweep, the ring that masks them passes; the one that takes
    cu_seqlens and ignores them, and the one that looks documents up by local indices, fail
    with the sentence that says so."""
    options = dict(method="ring", examples=8, documents=(True,), cu_seqlens_keyword="cu_seqlens",
                   pool=pool)  # fmt: skip
    report = check(small_impls.ring, **options)
    assert report.passed, str(report)
    assert all(r.case.cu_seqlens is not None for r in report.results)
    report = check(small_impls.ring, kwargs={"bug": "no-documents"}, **options)
    assert not report.passed
    assert "the documents are ignored" in str(report), str(report)
    report = check(small_impls.ring, kwargs={"bug": "local-documents"}, **options)
    assert not report.passed
    assert "document is looked up by its index in the rank's shard" in str(report), str(report)


def test_document_ids_reach_a_function_that_takes_segment_ids(pool):
    """document_ids_keyword: each rank gets its tokens' global document ids; a ring that
    rebuilds the documents from them passes, and one handed every token as document 0 fails."""
    options = dict(method="ring", examples=6, documents=(True,), pool=pool,
                   document_ids_keyword="document_ids")  # fmt: skip
    report = check(small_impls.ring_with_document_ids, **options)
    assert report.passed, str(report)
    # a passing report's messages and memory are one case's, and it says which
    widest = max(report.results, key=lambda r: r.case.world)
    assert f"information (case {widest.case.describe()}):" in str(report), str(report)
    report = check(_ids_all_zero, **options)
    assert not report.passed and "the documents are ignored" in str(report), str(report)


def _ids_all_zero(q, k, v, *, causal=False, group=None, document_ids=None):
    """The ids taken but every token put in one document: the documents are ignored."""
    zeros = None if document_ids is None else torch.zeros_like(document_ids)
    return small_impls.ring_with_document_ids(q, k, v, causal=causal, group=group,
                                              document_ids=zeros)  # fmt: skip


def test_documents_without_a_keyword_to_pass_them_refuse_to_start(pool):
    with pytest.raises(ValueError, match="names no cu_seqlens_keyword"):
        check(small_impls.ring, method="ring", documents=(True,), pool=pool)


def test_the_reproducer_names_what_it_cannot_import(pool):
    options = dict(kwargs={"bug": "diagonal", "helper": lambda x: x}, setup=lambda ctx: None)
    report = check(small_impls.ring, method="ring", cases=[_case(1)], pool=pool, **options)
    script = report.reproducer
    compile(script, "reproducer.py", "exec")
    assert "setup=your_setup," in script and "'helper': your_helper" in script
    assert "# define your_setup here" in script and "'bug': 'diagonal'" in script


def test_a_zero_lse_is_said_to_be_zero(pool):
    report = check(small_impls.ring, method="ring", cases=[_case(2)], kwargs={"bug": "zero-lse"},
                   pool=pool)  # fmt: skip
    assert "the LSE is zero" in str(report) or "all zeros" in str(report)


def test_a_wrong_all_to_all_split_is_a_head_permutation(pool):
    report = check(small_impls.ulysses, method="ulysses", examples=EXAMPLES,
                   causal_keyword="is_causal", kwargs={"bug": "split"}, pool=pool)  # fmt: skip
    assert not report.passed
    assert "the heads are permuted" in str(report), str(report)
    assert "all-to-all" in str(report)


def test_traffic_of_plain_torch_distributed_is_seen_and_compared(pool):
    report = check(small_impls.ring, method="ring", cases=[_case(4)], pool=pool)
    assert report.passed
    info = report.results[0].verdicts[0].information[0]
    # autograd sends dK, dV back round the ring: other messages than the oracle's, information
    assert "sends" in info and "bytes in backward" in info and "the method needs" in info, info


def test_sptutor_s_own_methods_pass_with_exact_messages(pool):
    for method in ("ring", "usp", "lasp"):
        report = check_sptutor(method, examples=6, pool=pool, enforce=("messages",))
        assert report.passed, str(report)


def test_a_function_that_raises_is_an_error_and_the_sweep_goes_on(pool):
    def broken(q, k, v, *, causal, group):
        raise RuntimeError("my kernel is not compiled for this head size")

    report = check(broken, method="ring", cases=[_case(2), _case(1)], pool=pool)
    assert [r.status for r in report.results] == ["error", "error"]
    assert "my kernel is not compiled" in report.results[0].error
    # every rank raises; the launch blames whichever did first
    assert re.match(r"ERROR: rank \d: RuntimeError: my kernel", report.results[0].summary())


def test_a_function_that_hangs_is_a_hang_with_where_each_rank_waits():
    def deadlocks(q, k, v, *, causal, group):
        rank = dist.get_rank(group)
        dist.recv(torch.empty(1), src=1 - rank)  # each waits to receive before it sends
        return small_impls.ring(q, k, v, causal=causal, group=group)[0]

    report = check(deadlocks, method="ring", cases=[_case(2)], world=2, timeout=5.0)
    result = report.results[0]
    assert result.status == "hang" and not report.passed
    assert "rank 0: waiting in torch.distributed" in result.error, result.error
    assert "rank 1: waiting in torch.distributed" in result.error
    assert result.summary().startswith("HANG:")


def _case(world: int) -> Case:
    return Case("ring", tuple(range(world)), "contiguous", True, batch=1, seq_len=4 * world,
                heads_q=2, heads_kv=1, head_dim=5, dtype="float32")  # fmt: skip
