"""sptutor.chain: where linear attention's state flows between chunks, and where documents cut
it; and chunks.decayed_sum over chunks of different lengths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import chunks
from sptutor.chain import Chain, check_order
from sptutor.layout import all_positions, document_ids
from sptutor.testing import assert_close
from tests.strategies import tensors


def chain(seq_len, world, offsets=None):
    positions = all_positions(seq_len, world=world)
    cu = None if offsets is None else torch.tensor(offsets)
    return Chain.of(positions, [None if cu is None else document_ids(cu, p) for p in positions])


def test_without_documents_the_state_runs_through_every_chunk():
    """S=11 on W=4: chunks of 3, 3, 3, 2; every rank after 0 reads and passes; the prefix of
    rank t is every rank before it, the suffix every rank after it."""
    c = chain(11, 4)
    assert c.lengths == (3, 3, 3, 2)
    assert c.segments == ((slice(0, 3),),) * 3 + ((slice(0, 2),),)
    assert c.reads == c.passes == (False, True, True, True)
    assert [c.before(t) for t in range(4)] == [slice(0, 0), slice(0, 1), slice(0, 2), slice(0, 3)]
    assert [c.after(t) for t in range(4)] == [slice(1, 4), slice(2, 4), slice(3, 4), slice(4, 4)]


def test_documents_cut_the_chain_at_their_starts():
    """Documents [0,2) [2,3) [3,7) [7,11) over chunks [0,3) [3,6) [6,9) [9,11): rank 0 has two
    segments; rank 1 starts a document at its first token (reads nothing, cuts); rank 2 holds
    the end of one and the start of the next; rank 3 continues rank 2's last document."""
    c = chain(11, 4, (0, 2, 3, 7, 11))
    assert c.segments == (
        (slice(0, 2), slice(2, 3)), (slice(0, 3),), (slice(0, 1), slice(1, 3)), (slice(0, 2),),
    )  # fmt: skip
    assert c.reads == (False, False, True, True)
    assert c.passes == (False, False, False, True)
    assert c.first(2) == slice(0, 1) and c.last(2) == slice(1, 3)
    # rank 2 reads rank 1's state alone; rank 3 reads rank 2's last segment's, cut there
    assert [c.before(t) for t in range(4)] == [slice(0, 0), slice(1, 1), slice(1, 2), slice(2, 3)]
    # rank 0's state is read by nobody; rank 1's by rank 2's first segment only
    assert [c.after(t) for t in range(4)] == [slice(1, 1), slice(2, 3), slice(3, 4), slice(4, 4)]


def test_a_document_over_every_rank_passes_the_state_through_one_token_chunks():
    """S = W = 5, one document from position 1: ranks 1..4 each pass the state on."""
    c = chain(5, 5, (0, 1, 5))
    assert c.reads == (False, False, True, True, True)
    assert c.passes == c.reads
    assert c.before(4) == slice(1, 4) and c.after(1) == slice(2, 5)


def test_an_empty_document_changes_nothing():
    """A repeated offset (an empty document) cuts nothing: same chain as without it."""
    assert chain(9, 3, (0, 4, 4, 9)) == chain(9, 3, (0, 4, 9))


@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_decayed_sum_decays_each_state_by_the_chunks_after_it(lengths, seed):
    """sum_n decay^(C_{n+1} + ... + C_{N-1}) states[n], chunk lengths C_n all different."""
    states = tensors(seed, *[(1, 2, 3, 3)] * len(lengths))
    decay = torch.tensor([0.9, 0.5], dtype=torch.float64)
    expected = sum(
        (decay ** sum(lengths[n + 1 :]))[:, None, None] * state for n, state in enumerate(states)
    )
    assert_close(chunks.decayed_sum(states, decay, lengths), expected)
    assert chunks.decayed_sum([], decay, []) is None


def test_chunks_out_of_order_are_a_value_error():
    """The chain needs rank t to own the t-th contiguous chunk."""
    positions = all_positions(7, world=2)
    with pytest.raises(ValueError, match=r"need the contiguous layout.*rank 0 with"):
        check_order(positions[::-1])
