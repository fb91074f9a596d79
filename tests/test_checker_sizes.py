"""How a check passes S and packed documents to a function: the adapter's keywords, the cases
a sweep draws (uneven S, documents), and the errors for cases no layout can cut."""

import pytest
import torch
from hypothesis import given, settings

from sptutor import layout
from sptutor.testing import Adapter, Case, Sweep


def _case(**fields) -> Case:
    base = dict(method="ring", members=(0, 1, 2), layout="zigzag", causal=True, batch=1,
                seq_len=13, heads_q=2, heads_kv=1, head_dim=4)  # fmt: skip
    return Case(**(base | fields))


def test_global_offsets_reach_the_keyword_unchanged():
    case = _case(cu_seqlens=(0, 4, 13))
    found = Adapter(cu_seqlens_keyword="cu", seq_len_keyword="n").keywords(case, None, None, 1)
    assert found["n"] == 13 and found["cu"].tolist() == [0, 4, 13]


def test_local_offsets_are_the_rank_s_own_runs_of_one_document():
    case = _case(cu_seqlens=(0, 4, 13))
    adapter = Adapter(cu_seqlens_keyword="cu", cu_seqlens_scope="local")
    for rank in range(3):
        expected = layout.local_documents(case.cu_seqlens_tensor(), world=3, rank=rank,
                                          layout="zigzag")[1]  # fmt: skip
        assert torch.equal(adapter.keywords(case, None, None, rank)["cu"], expected)


def test_document_ids_are_the_rank_s_tokens_documents_numbered_over_the_sequence():
    """document_ids_keyword: (S_r,) global document ids in the rank's storage order (zigzag
    here, so not sorted); none passed in a case without documents."""
    case = _case(cu_seqlens=(0, 4, 9, 13))
    adapter = Adapter(document_ids_keyword="ids")
    for rank in range(3):
        owned = layout.positions(13, world=3, rank=rank, layout="zigzag")
        expected = torch.searchsorted(torch.tensor([4, 9, 13]), owned, right=True)
        assert torch.equal(adapter.keywords(case, None, None, rank)["ids"], expected)
    assert "ids" not in adapter.keywords(_case(), None, None, 0)
    local = Adapter(cu_seqlens_keyword="cu", cu_seqlens_scope="local")
    assert local.keywords(_case(), None, None, 2)["cu"].tolist() == [0, 4]  # uneven: [0, S_r]


def test_an_uneven_case_without_documents_says_s_through_one_document():
    """No seq_len keyword: the one-document offsets [0, S] tell the function S."""
    found = Adapter(cu_seqlens_keyword="cu").keywords(_case(), None, None, 0)
    assert found["cu"].tolist() == [0, 13]
    assert "cu" not in Adapter(cu_seqlens_keyword="cu").keywords(_case(seq_len=12), None, None, 0)
    assert Adapter().keywords(_case(), None, None, 0).keys() == {"causal", "group"}


def test_a_bad_scope_or_bad_offsets_are_refused():
    with pytest.raises(ValueError, match="cu_seqlens_scope must be 'global' or 'local'"):
        Adapter(cu_seqlens_scope="both")
    with pytest.raises(ValueError, match="end at S=13"):
        _case(cu_seqlens=(0, 4, 12))


@settings(max_examples=40)
@given(Sweep(worlds=(1, 2, 3, 4), layouts=layout.LAYOUTS, uneven=(False, True),
             documents=(False, True)).strategy("ring"))  # fmt: skip
def test_the_sweep_draws_uneven_and_packed_cases_every_layout_can_cut(case):
    owned = case.positions()
    assert sum(len(p) for p in owned) == case.seq_len
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    assert case.uneven == (len({len(p) for p in owned}) > 1 or (
        case.layout == "zigzag" and case.seq_len % (2 * case.world) != 0))  # fmt: skip
    if case.cu_seqlens is not None:
        layout.check_cu_seqlens(case.cu_seqlens_tensor(), case.seq_len)
        assert "cu_seqlens=" in case.describe()


def test_local_offsets_do_not_say_which_document_a_run_is():
    """docs/checking.md's example: W=3, S=10, contiguous; (0, 4, 10) and (0, 4, 7, 10) give
    every rank the same local offsets, but different document ids (tokens 6 and 7)."""
    one, two = torch.tensor([0, 4, 10]), torch.tensor([0, 4, 7, 10])
    for rank, expected in enumerate(([0, 4], [0, 3], [0, 3])):
        for offsets in (one, two):
            assert layout.local_documents(offsets, world=3, rank=rank)[1].tolist() == expected
    ids = {name: torch.cat([layout.local_documents(o, world=3, rank=r)[0] for r in range(3)])
           for name, o in (("one", one), ("two", two))}  # fmt: skip
    assert ids["one"][6] == ids["one"][7] and ids["two"][6] != ids["two"][7]
