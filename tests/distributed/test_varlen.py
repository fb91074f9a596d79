"""Any S and packed documents on the real code, every softmax method, one launch of 4 gloo
processes: the hard corners (one token per rank, one-token and empty documents, documents on the
ranks' edges or over every rank, zigzag S = 2W + 1) match the oracle shard by shard, message by
message and in saved bytes (== sptutor.cost); and a sequence the layout cannot cut, or heads
Ulysses cannot split, raises the same ValueError on every rank before any message."""

import sptutor
from sptutor import launch, ledger
from sptutor.testing import Case
from tests.distributed.harness import LAUNCH_WORLD, check_results, run_on_rank
from tests.strategies import tensors

ALL, TRIO, PAIR = (0, 1, 2, 3), (1, 2, 3), (2, 3)
METHODS = ("ring", "rsa", "lss", "ulysses", "usp")


def _corners(method: str) -> list[Case]:
    """The corners for one method, on W = 4, 3, 2 (usp: U = 2, 3, 2). Hq=4, Hkv=2 split (or
    replicate) over U = 2 and 4; on W = 3 Ulysses and USP take Hq=6, Hkv=3."""
    usp = {"ulysses": 2} if method == "usp" else {}
    trio_usp = {"ulysses": 3} if method == "usp" else {}
    heads = (4, 2)
    trio_heads = (6, 3) if method in ("ulysses", "usp") else heads
    return [
        # S = W: one token per rank, each its own document: only the diagonal blocks compute
        Case(method, ALL, "contiguous", True, 1, 4, *heads, 3, "float64", seed=1,
             cu_seqlens=(0, 1, 2, 3, 4), **usp),
        # zigzag S = 2W + 1: chunks of 2 and 1 tokens, documents across ranks and an empty one
        Case(method, ALL, "zigzag", True, 2, 9, *heads, 5, "float32", seed=2,
             cu_seqlens=(0, 5, 5, 9), **usp),
        # striped S=7 on W=3 (3, 2, 2 tokens), documents on rank edges (positions 1, 2)
        Case(method, TRIO, "striped", False, 1, 7, *trio_heads, 4, "float16", seed=3,
             cu_seqlens=(0, 1, 2, 7), **trio_usp),
        # one document over every rank, contiguous S=11 on W=4 (3, 3, 3, 2 tokens)
        Case(method, ALL, "contiguous", False, 1, 11, *heads, 8, "float64", seed=4,
             cu_seqlens=(0, 11), **usp),
        # uneven without documents, W=2 zigzag S=5
        Case(method, PAIR, "zigzag", True, 1, 5, *heads, 3, "float64", seed=5, **usp),
    ]  # fmt: skip


CASES = [case for method in METHODS for case in _corners(method)]


def _bad_calls(rank: int) -> tuple[dict[str, str | None], int]:
    """Calls no layout can serve, on every rank: each one's error ('Type: message'), and the
    ledger events they logged (0: nothing reached the wire)."""
    one = tensors(rank, (1, 1, 4, 8))[0]  # one token per rank: S = 4 on W = 4
    three = tensors(rank, (1, 3, 6, 8))[0]  # S = 12 tokens, 6 heads: not a multiple of U = 4
    calls = {
        "S < W": lambda: sptutor.ring_attention(one, one, one, seq_len=3),
        "zigzag S < 2W": lambda: sptutor.lss_attention(one, one, one, layout="zigzag"),
        "rsa S < W": lambda: sptutor.rsa_attention(one, one, one, seq_len=2),
        "ulysses heads": lambda: sptutor.ulysses_attention(three, three, three, seq_len=13),
    }
    errors = {}
    with ledger.record() as led:
        for name, call in calls.items():
            try:
                call()
                errors[name] = None
            except ValueError as error:
                errors[name] = str(error)
    return errors, len(led.messages())


EXPECTED = {
    "S < W": "contiguous layout needs S >= W (every rank owns a token), got S=3, W=4",
    "zigzag S < 2W": "zigzag layout needs S >= 2*W (2W chunks of at least one token), got S=4, W=4",
    "rsa S < W": "contiguous layout needs S >= W (every rank owns a token), got S=2, W=4",
    "ulysses heads": "ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), got Hq=6, "
    "Hkv=6, U=4",
}


def _on_rank(rank: int, world: int, cases: list[Case]):
    return run_on_rank(rank, world, cases), _bad_calls(rank)


def test_real_methods_on_uneven_shards_and_packed_documents():
    """Every corner of every softmax method == the oracle == sptutor.cost; impossible sizes and
    heads are a ValueError with the numbers on every rank, nothing sent."""
    results = launch.spawn(_on_rank, LAUNCH_WORLD, (CASES,))
    check_results(CASES, [cases for cases, _ in results])
    for rank, (_, (errors, messages)) in enumerate(results):
        assert messages == 0, f"rank {rank} sent {messages} messages before raising"
        for name, message in EXPECTED.items():
            assert errors[name] is not None and message in errors[name], (rank, name, errors)
