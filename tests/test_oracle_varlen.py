"""Any S and packed documents, across the softmax oracles: exact against full attention with a
block-diagonal mask, bytes equal to sptutor.cost for uneven shards, and no compute on a block
whose tokens share no document (its messages still travel)."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import blocks, cost, oracle
from sptutor.testing import assert_close
from tests.strategies import tensors, uneven_mesh_case, uneven_softmax_case

RING_LIKE = ("ring", "rsa", "lss")  # any heads; ulysses and usp need heads that split over U
DTYPES = [torch.float64, torch.float32, torch.float16]


def _case(method):
    if method == "usp":
        return uneven_mesh_case()
    return uneven_mesh_case(pure_ulysses=True) if method == "ulysses" else uneven_softmax_case()


def _simulate(method, case, dtype=torch.float64):
    q, k, v, dout = (case[n].to(dtype) for n in ("q", "k", "v", "dout"))
    options = {"ulysses": case["ulysses"]} if method == "usp" else {}
    return oracle.simulate(method, q, k, v, dout, world=case["world"], causal=case["causal"],
                           layout=case["layout"], scale=case["scale"],
                           cu_seqlens=case["cu_seqlens"], **options)  # fmt: skip


def _truth(case):
    """out, lse of full attention with the case's documents, and dq, dk, dv by autograd."""
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, lse = oracle.full_attention(q, k, v, causal=case["causal"], scale=case["scale"],
                                     cu_seqlens=case["cu_seqlens"])  # fmt: skip
    out.backward(case["dout"])
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("method", [*RING_LIKE, "ulysses", "usp"])
@given(data=st.data())
def test_oracle_equals_full_attention_with_documents(method, data):
    """Any S >= W (zigzag 2W; shards differ by a token), documents anywhere (inside a shard, at
    rank edges, one token, empty, one over every rank), every layout, causal or not, GQA/MQA,
    W 1..8 (usp: every U·R = W): out, lse, dq, dk, dv == the block-diagonal ground truth."""
    case = data.draw(_case(method))
    sim = _simulate(method, case)
    # float64 vs float64 ground truth: the same sums reordered, the design's 1e-10 relative
    for name, want in zip(("out", "lse", "dq", "dk", "dv"), _truth(case)):
        assert_close(getattr(sim, name), want, what=f"{method} {name}")


@pytest.mark.parametrize("method", [*RING_LIKE, "ulysses", "usp"])
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_ledger_and_saved_bytes_equal_the_closed_form_for_any_s(method, data, dtype):
    """Uneven shards, documents or not: bytes each rank sends per phase, and saves, equal
    sptutor.cost with the layout (rings: each block at its size; collectives: padded to L)."""
    case = data.draw(_case(method))
    sim = _simulate(method, case, dtype)
    shape = cost.Shape.of(case["q"].to(dtype), case["k"])
    expected = cost.of(method, shape, case["world"], ulysses=case.get("ulysses"),
                       layout=case["layout"])  # fmt: skip
    world = case["world"]
    assert [sim.ledger.bytes_sent(r, "forward") for r in range(world)] == list(expected.forward)
    assert [sim.ledger.bytes_sent(r, "backward") for r in range(world)] == list(expected.backward)
    assert [record.saved_bytes for record in sim.ranks] == list(expected.saved)


@pytest.mark.parametrize("method", ["lasp", "lasp2"])
@given(st.integers(1, 6), st.integers(0, 11), st.booleans())
def test_linear_costs_hold_for_uneven_s(method, world, extra, causal):
    """LASP, LASP-2 on S = W..3W-1 tokens (contiguous): their D x D states do not depend on S,
    and each rank saves its own S_r tokens of q, k, v: ledger == sptutor.cost."""
    seq_len = world + extra % (2 * world)
    q, k, v, dout = tensors(world, *[(1, seq_len, 2, 3)] * 4)
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal)
    expected = cost.of(method, cost.Shape.of(q, k), world, causal=causal)
    assert [sim.ledger.bytes_sent(r, "forward") for r in range(world)] == list(expected.forward)
    assert [sim.ledger.bytes_sent(r, "backward") for r in range(world)] == list(expected.backward)
    assert [record.saved_bytes for record in sim.ranks] == list(expected.saved)


# useful multiply-adds per visible pair and query head, in units of D (work.attention_macs):
# forward the score and p·v; backward the score again, dV, dP, dQ, dK; RSA keeps P, so 4
PER_PAIR = {"forward": 2, "backward": 5}
RSA_PER_PAIR = {"forward": 2, "backward": 4}


@pytest.mark.parametrize("method", [*RING_LIKE, "ulysses", "usp"])
@given(data=st.data())
def test_compute_is_the_useful_pairs_and_skips_blocks_of_other_documents(method, data):
    """Summed over ranks, MACs are per-pair work times the pairs full attention with documents
    keeps; every compute event on one block has a visible pair, and every block with one is
    computed (ring and lss once per phase, rsa twice)."""
    case = data.draw(_case(method))
    sim = _simulate(method, case)
    batch, _, heads_q, head_dim = case["q"].shape
    seq_len = case["q"].shape[1]
    pos = torch.arange(seq_len)
    docs = None if case["cu_seqlens"] is None else _documents(case["cu_seqlens"], pos)
    pairs = int(blocks.visible_pairs(pos, pos, case["causal"], docs, docs).sum())
    per_pair = RSA_PER_PAIR if method == "rsa" else PER_PAIR
    for phase, factor in per_pair.items():
        assert sim.ledger.macs(phase=phase) == factor * batch * heads_q * head_dim * pairs
    if method in RING_LIKE:
        _assert_visible_blocks_computed(sim, case, 2 if method == "rsa" else 1)


def _documents(cu_seqlens, pos):
    """Document ids written out from cu_seqlens, not with sptutor.layout.document_ids."""
    return torch.tensor([sum(int(c) <= p for c in cu_seqlens[1:]) for p in pos.tolist()])


def _assert_visible_blocks_computed(sim, case, per_phase):
    positions = sim.positions
    docs = [None] * len(positions)
    if case["cu_seqlens"] is not None:
        docs = [_documents(case["cu_seqlens"], p) for p in positions]
    for phase in ("forward", "backward"):
        events = [e for e in sim.ledger.events if e.op == "compute" and e.phase == phase]
        computed = sorted((e.rank, e.block) for e in events if e.block is not None)
        visible = sorted(
            (rank, src) for rank in range(len(positions)) for src in range(len(positions))
            if blocks.any_visible(positions[rank], positions[src], case["causal"], docs[rank],
                                  docs[src])
        ) * per_phase  # fmt: skip
        assert computed == sorted(visible), phase


@pytest.mark.parametrize("method", RING_LIKE)
def test_documents_on_rank_edges_leave_each_rank_its_own_block(method):
    """W=4, S=10 contiguous (shards 3, 3, 2, 2), one document per shard: each rank computes
    only its own block, yet every block still travels (or is gathered) on the fixed schedule."""
    q, k, v, dout = tensors(1, (1, 10, 2, 4), (1, 10, 1, 4), (1, 10, 1, 4), (1, 10, 2, 4))
    cu_seqlens = torch.tensor([0, 3, 6, 8, 10])
    sim = oracle.simulate(method, q, k, v, dout, world=4, cu_seqlens=cu_seqlens)
    blocks_computed = {(e.rank, e.block) for e in sim.ledger.events if e.block is not None}
    assert blocks_computed == {(r, r) for r in range(4)}
    without = oracle.simulate(method, q, k, v, dout, world=4)
    assert [e.key() for e in sim.ledger.messages()] == [e.key() for e in without.ledger.messages()]


@pytest.mark.parametrize("method", [*RING_LIKE, "ulysses"])
@pytest.mark.parametrize(
    ("seq_len", "world", "lay", "message"),
    [
        (3, 4, "contiguous", "contiguous layout needs S >= W (every rank owns a token), got S=3"),
        (7, 4, "zigzag", "zigzag layout needs S >= 2*W (2W chunks of at least one token), got S=7"),
        (2, 3, "striped", "striped layout needs S >= W (every rank owns a token), got S=2, W=3"),
    ],
)  # fmt: skip
def test_sequences_too_short_to_cut_raise_naming_the_numbers(method, seq_len, world, lay, message):
    """The divisibility errors are gone; a sequence with fewer tokens than ranks (zigzag: 2W
    chunks) is still a ValueError naming S and W."""
    q, k, v = tensors(2, *[(1, seq_len, 4, 4)] * 3)
    with pytest.raises(ValueError, match=re.escape(message)):
        oracle.simulate(method, q, k, v, world=world, layout=lay)
