"""sptutor's check on two public libraries (examples/peers/): what the Peers docs page reports,
held to a few explicit cases so the findings cannot silently change. Needs the peers extra
(``pip install -e ".[peers]"``); ``-m "not peers"`` skips it offline."""

import pytest

from sptutor import launch
from sptutor.testing import Case, check

pytestmark = pytest.mark.peers
lasp_official = pytest.importorskip("examples.peers.lasp_official")  # before yunchang: triton
yunchang_usp = pytest.importorskip("examples.peers.yunchang_usp")

from scripts.peer_results import options_for  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    with launch.Pool(2, timeout=120.0) as running:
        yield running


def _run(module, config_name, case, pool):
    config = next(c for c in module.CONFIGS if c["name"] == config_name)
    return check(module.attention, method=module.ADAPTER["method"], cases=[case], pool=pool,
                 **options_for(module, config))  # fmt: skip


def _lasp_case(world, dtype="float32"):
    return Case("lasp", tuple(range(world)), "contiguous", True, batch=2, seq_len=64 * world,
                heads_q=2, heads_kv=1, head_dim=32, dtype=dtype, decay=(0.9, 0.75))  # fmt: skip


def _usp_case(world, ulysses, layout="contiguous", causal=False, dtype="float32"):
    return Case("usp", tuple(range(world)), layout, causal, batch=1, seq_len=4 * world,
                heads_q=4, heads_kv=4, head_dim=4, dtype=dtype, ulysses=ulysses)  # fmt: skip


def test_lasp_naive_matches_the_oracle(pool):
    report = _run(lasp_official, "lasp_naive", _lasp_case(2), pool)
    assert report.passed, str(report)


def test_lasp_cache_is_wrong_after_the_first_rank(pool):
    report = _run(lasp_official, "lasp_cache", _lasp_case(2), pool)
    verdicts = report.results[0].verdicts
    assert not verdicts[0].wrong and "out" in verdicts[1].wrong, str(report)


def test_lasp_fuse_parallel_computes_float64_in_float32(pool):
    report = _run(lasp_official, "lasp_fuse_parallel", _lasp_case(1, "float64"), pool)
    assert "right only to float32's precision" in str(report), str(report)


def test_yunchang_basic_rounds_dq_through_bfloat16(pool):
    report = _run(yunchang_usp, "basic", _usp_case(1, 1), pool)
    assert report.results[0].verdicts[0].wrong == ["dq"], str(report)
    assert "right only to bfloat16's precision" in str(report)


def test_yunchang_zigzag_on_ulysses_alone_matches_the_oracle(pool):
    report = _run(yunchang_usp, "zigzag", _usp_case(2, 2, "zigzag", causal=True), pool)
    assert report.passed, str(report)
