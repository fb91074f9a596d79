"""The block math (sptutor.blocks) against the ground truth and autograd."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import blocks, work
from sptutor.oracle import reference
from sptutor.testing import assert_no_worse_than_baseline, gradient_floor, relative_error
from tests.strategies import heads, positions, tensors

# Everything here is float64 and the same math reordered: errors are ~1e-16 relative; 1e-12 leaves
# room for the growth of sums over a few dozen terms while any real mistake shows as >1e-3.
TIGHT = 1e-12
FLOAT32 = 1e-5  # float32 results: the design's float32 tolerance (justified where it is used)


@st.composite
def block_case(draw, max_seq=8):
    """Random q/k/v, global positions (repeats, any order), scale, causal."""
    batch = draw(st.integers(1, 2))
    seq_q, seq_k = draw(st.integers(1, max_seq)), draw(st.integers(1, max_seq))
    heads_q, heads_kv = draw(heads())
    head_dim = draw(st.sampled_from([1, 3, 8, 24]))
    q, k, v, dout = tensors(
        draw(st.integers(0, 99)),
        (batch, seq_q, heads_q, head_dim),
        (batch, seq_k, heads_kv, head_dim),
        (batch, seq_k, heads_kv, head_dim),
        (batch, seq_q, heads_q, head_dim),
    )
    return dict(
        q=q,
        k=k,
        v=v,
        dout=dout,
        q_pos=draw(positions(seq_q, 10)),
        k_pos=draw(positions(seq_k, 10)),
        causal=draw(st.booleans()),
        scale=draw(st.floats(0.1, 1.5)),
    )


@given(block_case())
def test_attention_block_equals_full_attention(case):
    """One block over all keys is full attention (out and lse), masks from positions."""
    c = case
    out, lse = blocks.attention_block(
        c["q"], c["k"], c["v"], c["q_pos"], c["k_pos"], c["causal"], c["scale"]
    )
    expected_out, expected_lse = reference.full_attention(
        c["q"],
        c["k"],
        c["v"],
        causal=c["causal"],
        scale=c["scale"],
        q_pos=c["q_pos"],
        k_pos=c["k_pos"],
    )
    assert relative_error(out, expected_out) <= TIGHT
    assert relative_error(lse, expected_lse) <= TIGHT


def split_keys(draw, seq_k):
    """A random partition of range(S_k) into 1..4 non-empty-or-empty blocks (index tensors)."""
    count = draw(st.integers(1, 4))
    owner = draw(st.lists(st.integers(0, count - 1), min_size=seq_k, max_size=seq_k))
    return [
        torch.tensor([j for j in range(seq_k) if owner[j] == b], dtype=torch.long)
        for b in range(count)
    ]


@given(block_case(), st.data())
def test_merging_any_split_of_the_keys_equals_attention_over_all(case, data):
    """Blocks of any partition of the keys, merged by LSE, give full attention (even empty ones)."""
    c = case
    out = lse = None
    for idx in split_keys(data.draw, c["k"].shape[1]):
        part = blocks.attention_block(
            c["q"],
            c["k"][:, idx],
            c["v"][:, idx],
            c["q_pos"],
            c["k_pos"][idx],
            c["causal"],
            c["scale"],
        )
        out, lse = part if out is None else blocks.merge(out, lse, *part)
    expected_out, expected_lse = reference.full_attention(
        c["q"],
        c["k"],
        c["v"],
        causal=c["causal"],
        scale=c["scale"],
        q_pos=c["q_pos"],
        k_pos=c["k_pos"],
    )
    assert relative_error(out, expected_out) <= TIGHT
    assert relative_error(lse, expected_lse) <= TIGHT


def three_parts(seed):
    """Three partial results with some -inf rows, as blocks of a masked ring produce them."""
    parts = []
    for i in range(3):
        out, lse = tensors(seed + i, (2, 5, 3, 4), (2, 3, 5))
        lse[:, :, i] = -math.inf  # row i of part i saw no key
        out[:, i] = 0.0
        parts.append((out, lse))
    return parts


@given(st.integers(0, 1000))
def test_merge_is_commutative_and_associative(seed):
    """merge(a, b) == merge(b, a) and (a+b)+c == a+(b+c), up to float64 rounding."""
    a, b, c = three_parts(seed)
    for x, y in zip(blocks.merge(*a, *b), blocks.merge(*b, *a)):
        assert relative_error(x, y) <= TIGHT
    left = blocks.merge(*blocks.merge(*a, *b), *c)
    right = blocks.merge(*a, *blocks.merge(*b, *c))
    for x, y in zip(left, right):
        assert relative_error(x, y) <= TIGHT


@given(st.integers(0, 1000))
def test_merging_an_empty_block_is_the_identity(seed):
    """A block whose rows see nothing (out 0, lse -inf) leaves the result unchanged, exactly."""
    out, lse = three_parts(seed)[0]
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, -math.inf)
    merged_out, merged_lse = blocks.merge(out, lse, empty_out, empty_lse)
    assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)
    both_empty = blocks.merge(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(both_empty[0], empty_out) and torch.equal(both_empty[1], empty_lse)


def test_merge_is_stable_for_huge_lse():
    """LSEs of 1e4 do not overflow: the merge shifts by the larger one."""
    out_a, out_b = torch.ones(1, 1, 1, 2), 3 * torch.ones(1, 1, 1, 2)
    lse_a, lse_b = torch.full((1, 1, 1), 1e4), torch.full((1, 1, 1), 1e4)
    out, lse = blocks.merge(out_a, lse_a, out_b, lse_b)
    assert torch.allclose(out, 2 * torch.ones(1, 1, 1, 2))
    assert torch.allclose(lse, torch.tensor(1e4 + math.log(2)))


@given(block_case(), st.data())
def test_block_backward_summed_over_any_split_equals_autograd(case, data):
    """FA2 block gradients (final out/lse), summed over a split of the keys, equal autograd."""
    c = case
    q, k, v = (c[name].clone().requires_grad_() for name in ("q", "k", "v"))
    out, lse = reference.full_attention(
        q, k, v, causal=c["causal"], scale=c["scale"], q_pos=c["q_pos"], k_pos=c["k_pos"]
    )
    out.backward(c["dout"])
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for idx in split_keys(data.draw, k.shape[1]):
        block_dq, dk[:, idx], dv[:, idx] = blocks.attention_block_backward(
            c["dout"],
            c["q"],
            c["k"][:, idx],
            c["v"][:, idx],
            out.detach(),
            lse.detach(),
            c["q_pos"],
            c["k_pos"][idx],
            c["causal"],
            c["scale"],
        )
        dq += block_dq
    for got, expected in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert relative_error(got, expected) <= TIGHT


@given(block_case(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_16_bit_blocks_accumulate_in_float32(case, dtype):
    """16-bit blocks equal float64 attention on the same rounded inputs to float32 rounding."""
    c = case
    q, k, v = (c[name].to(dtype) for name in ("q", "k", "v"))
    out, lse = blocks.attention_block(q, k, v, c["q_pos"], c["k_pos"], c["causal"], c["scale"])
    assert out.dtype == lse.dtype == torch.float32
    expected_out, expected_lse = reference.full_attention(
        q.double(), k.double(), v.double(), causal=c["causal"], scale=c["scale"],
        q_pos=c["q_pos"], k_pos=c["k_pos"],
    )  # fmt: skip
    # the rounded inputs are exact in float64, so only float32 rounding (6e-8) of sums over <= 24
    # terms is left: at most 2e-6 in 400 draws (outputs that cancel); one 16-bit rounding of a
    # score or a probability alone costs 2.4e-4 (fp16) or 2e-3 (bf16) of it, so 1e-5 tells
    # float32 accumulation from 16-bit
    assert relative_error(out, expected_out) <= FLOAT32
    assert relative_error(lse, expected_lse) <= FLOAT32


def test_an_overflowed_16_bit_baseline_is_refused_not_passed():
    """The 16-bit rule refuses a baseline that overflowed, instead of passing any answer."""
    q, k, v = tensors(0, (1, 16, 2, 64), (1, 16, 2, 64), (1, 16, 2, 64))
    q, k = 100 * q, 100 * k  # q·k ~ 1e4·8: past float16's 65504 for many pairs
    truth_out, truth_lse = reference.full_attention(q, k, v)
    base_out, base_lse = reference.full_attention(q.half(), k.half(), v.half())
    pos = torch.arange(16)
    out, lse = blocks.attention_block(q.half(), k.half(), v.half(), pos, pos, False, 64**-0.5)
    assert bool(torch.isinf(base_lse).any()) and bool(torch.isfinite(lse).all())
    for got, base, want in ((lse + 100, base_lse, truth_lse), (out, base_out, truth_out)):
        with pytest.raises(AssertionError, match="the naive baseline overflowed"):
            assert_no_worse_than_baseline(got, base, want)


def test_attention_macs_count_visible_pairs():
    """Useful MACs = 2·B·Hq·D·(visible pairs): causal halves-plus-diagonal of a square block."""
    pos = torch.arange(4)
    assert work.attention_macs(pos, pos, False, 2, 3, 5) == 2 * 2 * 3 * 5 * 16
    assert work.attention_macs(pos, pos, True, 2, 3, 5) == 2 * 2 * 3 * 5 * 10
    assert work.attention_macs(pos, pos + 4, True, 1, 1, 1) == 0


@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(-1, 2)), min_size=1, max_size=7),
    st.lists(st.tuples(st.integers(0, 12), st.integers(-1, 2)), min_size=1, max_size=7),
    st.booleans(),
    st.booleans(),
)
def test_any_visible_says_whether_the_mask_shows_any_pair(queries, keys, causal, documents):
    """any_visible (per document: latest query against earliest key, never an S_q x S_k mask)
    == visible_pairs(...).any() for any positions, document ids and padding (-1); and
    visible_blocks is that, for every pair of ranks."""
    q_pos, q_doc = (torch.tensor(column) for column in zip(*queries))
    k_pos, k_doc = (torch.tensor(column) for column in zip(*keys))
    if not documents:
        q_doc = k_doc = None
    shown = bool(blocks.visible_pairs(q_pos, k_pos, causal, q_doc, k_doc).any())
    assert blocks.any_visible(q_pos, k_pos, causal, q_doc, k_doc) == shown
    table = blocks.visible_blocks([q_pos, k_pos], [q_doc, k_doc], causal)
    assert table[0][1] == shown
    assert table[1][0] == bool(blocks.visible_pairs(k_pos, q_pos, causal, k_doc, q_doc).any())


def test_a_gradient_that_is_zero_is_judged_against_the_rows_dout():
    """Queries that each see one key (one-token documents) have dq = 0 and dk = 0 exactly; the
    same math in another order gives rounding noise there, which relative to ‖expected‖ (itself
    noise) looks 100% wrong, and relative to the gradient floor ‖dout‖ is ~1e-16. A real
    mistake, a block's dv missing, is still as large as the gradient."""
    q, k, v, dout = tensors(3, (1, 6, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8))
    pos, doc = torch.arange(6), torch.arange(6)  # six one-token documents
    out, lse = blocks.attention_block(q, k, v, pos, pos, True, 0.35, doc, doc)
    dq, _, dv = blocks.attention_block_backward(dout, q, k, v, out, lse, pos, pos, True, 0.35,
                                                doc, doc)  # fmt: skip
    assert dq.abs().max() < 1e-14  # zero, to roundoff
    reordered = dq.roll(1, dims=1)  # other roundoff of the same size, as other sums leave it
    assert relative_error(reordered, dq) > 1e-3  # noise against noise: meaningless
    floor = gradient_floor(dout)
    assert relative_error(reordered, dq, floor) < TIGHT
    assert relative_error(torch.zeros_like(dv), dv, floor) > 0.1  # a missing dv is caught
