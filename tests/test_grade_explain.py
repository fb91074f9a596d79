"""The grader's one sentence for errors on uneven shards: whichever rank the launch blames (the
one whose block maths met another size, the one gloo ended for a message of the wrong size, or
a peer that lost it; on the torch or the fused backend), a block taken for another rank's is
named a wrong peer."""

import pytest

from sptutor.checker.report import CaseResult
from sptutor.exercises.grade import explain
from sptutor.testing import Case

SIZES = 'File "/x/sptutor/blocks.py", line 94, in _scores\nRuntimeError: The size of tensor a (5) must match the size of tensor b (4) at non-singleton dimension 4'  # noqa: E501
FUSED = 'File "/x/sptutor/fused.py", line 50, in _check_lengths\nValueError: a block of 4 keys has 5 positions'  # noqa: E501
BLAMED = {
    "block maths": f"rank 2 of 4 failed:\nTraceback (most recent call last):\n  {SIZES}",
    "fused block": f"rank 2 of 4 failed:\nTraceback (most recent call last):\n  {FUSED}",
    "ended by gloo": "rank 1 of 4 was killed by signal 6 (SIGABRT) before answering",
    "a peer lost": "rank 0 of 4 failed:\nRuntimeError: [pair.cc:553] Connection closed by peer",
}


def _case(seq_len: int) -> Case:
    return Case("ring", (0, 1, 2), "contiguous", True, 1, seq_len, 1, 1, 4, "float64")


@pytest.mark.parametrize("text", BLAMED.values(), ids=BLAMED.keys())
def test_a_size_error_on_uneven_shards_is_a_wrong_peer(text):
    category, sentence = explain(CaseResult(_case(13), "error", error=text))
    assert category == "wrong peer" and "masked as another rank's" in sentence


def test_the_same_error_on_even_shards_stays_an_error():
    category, _ = explain(CaseResult(_case(12), "error", error=BLAMED["ended by gloo"]))
    assert category == "an error"
