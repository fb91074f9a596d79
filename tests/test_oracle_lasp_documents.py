"""The LASP and LASP-2 oracles with any S and packed documents: exact against the ground truth,
the state never crosses a document, the same messages whatever the documents."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sptutor import oracle, work
from sptutor.chain import Chain
from sptutor.layout import all_positions, document_ids
from sptutor.testing import assert_close
from tests.distributed.linear_cases import document_offsets
from tests.strategies import attention_inputs, decays, heads, tensors

# float64 oracle vs float64 ground truth: the same sums regrouped by segment and rank (the
# design's float64 tolerance, assert_close's relative 1e-10): ~4e-16 observed over 600 random
# cases, while a state leaking across a document or a wrong decay power is an O(1e-2) error.

METHODS = ("lasp", "lasp2")


@st.composite
def document_case(draw, max_world: int = 8, causal=None, documents: bool = True):
    """Full float64 inputs of one linear simulation with S >= W anywhere (chunks may differ by
    one token), packed documents (causal) or none, decay or none, GQA/MQA, odd D."""
    world = draw(st.integers(1, max_world))
    seq_len = draw(st.integers(world, 3 * world + 3))
    (heads_q, heads_kv), head_dim = draw(heads()), draw(st.sampled_from((1, 3, 8)))
    causal = draw(st.booleans()) if causal is None else causal
    q, k, v, dout = attention_inputs(
        draw(st.integers(0, 10**6)), draw(st.integers(1, 2)), seq_len, heads_q, heads_kv, head_dim
    )
    cu = None
    if documents and causal:
        cu = torch.tensor(draw(document_offsets(seq_len, world)))
    decay = draw(decays(heads_q)) if causal else None
    return dict(q=q, k=k, v=v, dout=dout, world=world, causal=causal, decay=decay, cu_seqlens=cu)


def simulate(method, case, **changes):
    case = case | changes
    return oracle.simulate(method, case["q"], case["k"], case["v"], case["dout"],
                           world=case["world"], causal=case["causal"], decay=case["decay"],
                           cu_seqlens=case["cu_seqlens"])  # fmt: skip


def truth(case):
    """out of the ground truth with documents and dq, dk, dv by autograd."""
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = oracle.full_linear_attention(q, k, v, causal=case["causal"], decay=case["decay"],
                                       cu_seqlens=case["cu_seqlens"])  # fmt: skip
    out.backward(case["dout"])
    return out.detach(), q.grad, k.grad, v.grad


def chain_of(case):
    positions = all_positions(case["q"].shape[1], world=case["world"])
    cu = case["cu_seqlens"]
    documents = [None if cu is None else document_ids(cu, p) for p in positions]
    return positions, Chain.of(positions, documents)


def _explicit(world, seq_len, offsets, seed=0, decay=True):
    """A hand-picked case: W, S, cu_seqlens offsets, Hq=2 over Hkv=1, D=3."""
    q, k, v, dout = attention_inputs(seed, 1, seq_len, 2, 1, 3)
    rates = torch.tensor([0.9, 0.6], dtype=torch.float64) if decay else None
    return dict(q=q, k=k, v=v, dout=dout, world=world, causal=True, decay=rates,
                cu_seqlens=torch.tensor(offsets))  # fmt: skip


EXPLICIT = [
    _explicit(4, 11, (0, 2, 3, 6, 11)),  # inside chunks, at a rank edge, a one-token document
    _explicit(4, 13, (0, 13)),  # one document over every rank
    _explicit(3, 9, (0, 3, 6, 9)),  # exactly at the rank edges
    _explicit(3, 7, tuple(range(8))),  # every token its own document
    _explicit(2, 9, (0, 1, 2, 4, 4, 5, 9)),  # several in one chunk, an empty one
    _explicit(5, 5, (0, 1, 5)),  # C = 1: the state passes through one-token chunks
]


@pytest.mark.parametrize("method", METHODS)
@given(case=document_case())
@example(case=EXPLICIT[0])
@example(case=EXPLICIT[1])
@example(case=EXPLICIT[2])
@example(case=EXPLICIT[3])
@example(case=EXPLICIT[4])
@example(case=EXPLICIT[5])
def test_oracle_equals_full_linear_attention_with_documents(method, case):
    """out, dq, dk, dv == the ground truth with cu_seqlens (W 1..8, any S, documents anywhere,
    decay, GQA) — and non-causal with any S, without documents."""
    sim = simulate(method, case)
    for name, want in zip(("out", "dq", "dk", "dv"), truth(case)):
        assert_close(getattr(sim, name), want, what=f"{method} {name}")


@pytest.mark.parametrize("method", METHODS)
@given(case=document_case(causal=True))
def test_each_rank_keeps_the_state_of_its_document_before_its_chunk(method, case):
    """state_in: the state of the document the chunk continues, from that document's start up to
    the token before the chunk, by definition; None on rank 0 and where a chunk starts one."""
    k, v, decay, cu = case["k"], case["v"], case["decay"], case["cu_seqlens"]
    heads_q = case["q"].shape[2]
    positions, chain = chain_of(case)
    sim = simulate(method, case)
    for rank, (record, pos) in enumerate(zip(sim.ranks, positions)):
        end = int(pos[0])  # the chunk's first token's document starts at `start`
        start = 0 if cu is None else int(cu[cu <= end].max())
        if start == end:
            assert record.state_in is None and not chain.reads[rank]
            continue
        assert chain.reads[rank]
        kk, vv = (x[:, start:end].repeat_interleave(heads_q // x.shape[2], dim=2) for x in (k, v))
        rates = torch.ones(heads_q, dtype=k.dtype) if decay is None else decay
        weights = rates[:, None] ** (end - 1 - torch.arange(start, end))  # (Hq, end - start)
        assert_close(record.state_in, torch.einsum("hj,bjhd,bjhe->bhde", weights, kk, vv))


@pytest.mark.parametrize("method", METHODS)
@given(case=document_case(causal=True))
def test_messages_are_the_same_whatever_the_documents(method, case):
    """Every message (op, peers, bytes, phase, step) equals the one-document run's; saved bytes
    are q, k, v of C_t tokens plus one state where the chunk reads one."""
    with_documents, one_document = simulate(method, case), simulate(method, case, cu_seqlens=None)
    keys = [e.key() for e in with_documents.ledger.messages()]
    assert keys == [e.key() for e in one_document.ledger.messages()]
    positions, chain = chain_of(case)
    batch, _, heads_q, head_dim = case["q"].shape
    heads_kv, state = case["k"].shape[2], batch * heads_q * head_dim**2 * 8
    for rank, (record, pos) in enumerate(zip(with_documents.ranks, positions)):
        qkv = batch * len(pos) * (heads_q + 2 * heads_kv) * head_dim * 8
        assert record.saved_bytes == qkv + (state if chain.reads[rank] else 0)


@pytest.mark.parametrize("method", METHODS)
@given(case=document_case(causal=True))
def test_intra_chunk_work_counts_only_pairs_of_one_document(method, case):
    """Each rank's first compute event (its intra part) has the macs of the causal pairs of one
    document in its chunk (``work.attention_macs`` with documents), forward and backward."""
    positions, _ = chain_of(case)
    cu, (batch, _, heads_q, head_dim) = case["cu_seqlens"], case["q"].shape
    events = simulate(method, case).ledger.events
    for rank, pos in enumerate(positions):
        doc = None if cu is None else document_ids(cu, pos)
        pairs = work.attention_macs(pos, pos, True, batch, heads_q, head_dim, q_doc=doc, k_doc=doc)
        for phase, scale in (("forward", 2), ("backward", 5)):
            first = next(e for e in events if e.op == "compute" and e.rank == rank
                         and e.phase == phase)  # fmt: skip
            assert first.macs == pairs * scale // 2


@pytest.mark.parametrize("method", METHODS)
@given(case=document_case(causal=True), seed=st.integers(0, 99), data=st.data())
def test_changing_one_document_leaves_every_other_token_bit_identical(method, case, seed, data):
    """New q, k, v in one document: out, dq, dk, dv of every token outside it are unchanged to
    the bit, on every rank (no state, and no gradient, crosses a document boundary)."""
    offsets = case["cu_seqlens"].tolist()
    n = data.draw(st.integers(0, len(offsets) - 2), label="document")
    part = slice(offsets[n], offsets[n + 1])
    changed = {}
    for name in ("q", "k", "v"):
        fresh = tensors(seed, case[name].shape)[0]
        changed[name] = case[name].clone()
        changed[name][:, part] = fresh[:, part]
    before, after = simulate(method, case), simulate(method, case, **changed)
    outside = torch.ones(case["q"].shape[1], dtype=torch.bool)
    outside[part] = False
    for name in ("out", "dq", "dk", "dv"):
        assert torch.equal(getattr(before, name)[:, outside], getattr(after, name)[:, outside])


@pytest.mark.parametrize("method", METHODS)
def test_non_causal_with_documents_is_a_value_error_before_any_message(method):
    """One D×D sum over all ranks cannot keep documents apart: a ValueError that says so."""
    q, k, v = tensors(0, (1, 6, 2, 3), (1, 6, 1, 3), (1, 6, 1, 3))
    with pytest.raises(ValueError, match=f"{method}: packed documents .* need causal=True"):
        oracle.simulate(method, q, k, v, world=2, causal=False, cu_seqlens=torch.tensor([0, 6]))
