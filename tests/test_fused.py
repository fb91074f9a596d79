"""The fused CPU backend (sptutor.fused) against the readable block math (sptutor.blocks)."""

import contextlib
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sptutor import backends, blocks, fused, fused_plan, layout
from sptutor.tolerances import gradient_floor, relative_error
from tests.strategies import HEAD_DIMS, documents, heads, positions, scales, shard_edges, tensors

# float64 on both sides, the same sums in another order (sub-blocks merged by LSE): errors are
# ~1e-15 relative; 1e-12 leaves room for a few merges while any wrong mask or merge is > 1e-3.
TIGHT = 1e-12
# float32 against the float64 truth: rounding of ~eps32 = 6e-8 per step over sums of up to ~100
# keys, exp and log: ~1e-6 at worst; 1e-5 keeps a 10x margin, and a real mistake is > 1e-3.
FLOAT32 = 1e-5


def gradient_error(got: torch.Tensor, expected: torch.Tensor, dout: torch.Tensor) -> float:
    """``‖got − expected‖ / max(‖expected‖, ‖dout‖)`` (``tolerances.gradient_floor``): a
    relative error that stays meaningful where a gradient cancels (a row over one key has
    dq = dk = 0 exactly, known to roundoff only)."""
    return relative_error(got, expected, gradient_floor(dout))


@st.composite
def layout_block(draw, max_world: int = 4):
    """A block as the methods make one: positions of rank and src of a layout (or, as Ulysses,
    the gathered sequence on both sides), uneven S, packed documents (some padding, id -1)."""
    world, lay = draw(st.integers(1, max_world)), draw(st.sampled_from(layout.LAYOUTS))
    unit = 2 * world if lay == "zigzag" else world
    seq_len = draw(st.integers(unit, 4 * unit + unit - 1))  # mostly not a multiple of the unit
    cut = layout.all_positions(seq_len, world=world, layout=lay, device="cpu")
    if draw(st.booleans()):  # the Ulysses block: every rank's tokens, in rank order
        q_pos = k_pos = torch.cat(cut)
    else:
        q_pos, k_pos = cut[draw(st.integers(0, world - 1))], cut[draw(st.integers(0, world - 1))]
    cu_seqlens = draw(documents(seq_len, shard_edges(seq_len, world, lay)))
    docs = q_doc = k_doc = None  # docs: (S,) every position's document
    if cu_seqlens is not None:
        docs = layout.document_ids(cu_seqlens, torch.arange(seq_len))
        padding = draw(st.integers(-1, len(cu_seqlens) - 2))  # this document is padding (-1: none)
        docs = torch.where(docs == padding, -1, docs)
        q_doc, k_doc = docs[q_pos], docs[k_pos]
    return dict(q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, docs=docs, seq_len=seq_len)


@st.composite
def fused_case(draw, dtype=torch.float64):
    """A layout block with q (B, S_q, Hq, D), k, v of the block (B, S_k, Hkv, D), k, v of the
    whole sequence (for the rows' final out and lse), dout, causal and scale."""
    case = draw(layout_block())
    heads_q, heads_kv = draw(heads())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    seq_q, seq_len = len(case["q_pos"]), case["seq_len"]
    q, dout, k_all, v_all = tensors(
        draw(st.integers(0, 10**6)), (batch, seq_q, heads_q, head_dim),
        (batch, seq_q, heads_q, head_dim), (batch, seq_len, heads_kv, head_dim),
        (batch, seq_len, heads_kv, head_dim), dtype=dtype,
    )  # fmt: skip
    scale = draw(scales(head_dim))
    case.update(q=q, dout=dout, k_all=k_all, v_all=v_all, causal=draw(st.booleans()),
                scale=head_dim**-0.5 if scale is None else scale)  # fmt: skip
    case.update(k=k_all[:, case["k_pos"]], v=v_all[:, case["k_pos"]])
    case["call_cost"] = draw(st.sampled_from([0, fused_plan.CALL_COST]))  # 0: the plan, even here
    return case


@contextlib.contextmanager
def call_cost(value: int):
    """fused_plan.CALL_COST set to ``value`` inside. Blocks this small are one masked call at the
    real cost; at 0 they take their plan (full, causal and masked sub-blocks, merged)."""
    saved, fused_plan.CALL_COST = fused_plan.CALL_COST, value
    try:
        yield
    finally:
        fused_plan.CALL_COST = saved


def _block(c):
    """The block's arguments after q, k, v: positions, causal, scale, documents."""
    return c["q_pos"], c["k_pos"], c["causal"], c["scale"], c["q_doc"], c["k_doc"]


def _final(c):
    """The rows' final out and lse: the queries over every key of the sequence (blocks)."""
    every = torch.arange(c["seq_len"])
    docs = (None, None) if c["docs"] is None else (c["q_doc"], c["docs"])
    return blocks.attention_block(c["q"], c["k_all"], c["v_all"], c["q_pos"], every,
                                  c["causal"], c["scale"], *docs)  # fmt: skip


@given(fused_case())
def test_forward_equals_the_block_math(case):
    """out and lse of any layout's block equal blocks.attention_block (-inf rows included)."""
    c = case
    with call_cost(c["call_cost"]):
        out, lse = fused.attention_forward(c["q"], c["k"], c["v"], *_block(c))
    expected_out, expected_lse = blocks.attention_block(c["q"], c["k"], c["v"], *_block(c))
    assert out.dtype == expected_out.dtype and lse.dtype == expected_lse.dtype
    assert relative_error(out, expected_out) <= TIGHT
    assert relative_error(lse, expected_lse) <= TIGHT  # same -inf rows, or the error is inf


@given(fused_case())
def test_backward_equals_the_block_math(case):
    """dq, dk, dv of a block from the rows' final out and lse equal the block math's."""
    c = case
    out, lse = _final(c)
    args = (c["dout"], c["q"], c["k"], c["v"], out, lse, *_block(c))
    with call_cost(c["call_cost"]):
        grads = fused.attention_backward(*args)
    for got, expected in zip(grads, blocks.attention_block_backward(*args)):
        assert bool(torch.isfinite(got).all())
        assert gradient_error(got, expected, c["dout"]) <= TIGHT


@settings(max_examples=15)
@given(fused_case(dtype=torch.float32))
def test_float32_is_as_close_to_the_truth_as_float32_allows(case):
    """float32 forward and backward against the float64 block math on the same numbers."""
    c = case
    wide = {**c, **{n: c[n].double() for n in ("q", "k", "v", "dout", "k_all", "v_all")}}
    final_out, final_lse = _final(wide)
    with call_cost(c["call_cost"]):
        out, lse = fused.attention_forward(c["q"], c["k"], c["v"], *_block(c))
        grads = fused.attention_backward(c["dout"], c["q"], c["k"], c["v"], final_out.float(),
                                         final_lse.float(), *_block(c))  # fmt: skip
    expected_out, expected_lse = blocks.attention_block(wide["q"], wide["k"], wide["v"],
                                                        *_block(c))  # fmt: skip
    assert out.dtype == torch.float32
    assert relative_error(out, expected_out) <= FLOAT32
    assert relative_error(lse, expected_lse) <= FLOAT32
    expected = blocks.attention_block_backward(wide["dout"], wide["q"], wide["k"], wide["v"],
                                               final_out, final_lse, *_block(c))  # fmt: skip
    for got, truth in zip(grads, expected):
        assert gradient_error(got, truth, wide["dout"]) <= FLOAT32


def _pitfall_inputs(dtype=torch.float64):
    """Blocks with rows that see no key: causal queries before every key (an unmasked and a
    masked sub-block: strides 1 and 2), and padding queries (document -1)."""
    q, k, v, dout = tensors(7, (2, 6, 4, 3), (2, 5, 2, 3), (2, 5, 2, 3), (2, 6, 4, 3), dtype=dtype)
    return q, k, v, dout, [
        (torch.arange(6), torch.arange(3, 8), None, None),  # queries 0..2 see nothing
        (torch.arange(0, 12, 2), torch.arange(5, 10), None, None),  # 0, 2, 4 see nothing
        (torch.arange(6), torch.arange(5), torch.tensor([-1, -1, 0, 0, -1, 0]),
         torch.tensor([0, 0, 0, -1, 0])),  # padding queries 0, 1, 4
    ]  # fmt: skip


@pytest.mark.parametrize("cost", [0, fused_plan.CALL_COST])
@pytest.mark.parametrize("case", range(3))
def test_rows_that_see_no_key_get_lse_minus_inf_and_zero_gradients(monkeypatch, case, cost):
    """The kernel gives a fully masked row lse 0 (which a merge would count as a key) and NaN
    gradients for lse -inf: here such rows have out 0, lse -inf, and zero, finite gradients
    (planned sub-blocks at cost 0, one masked call at the real cost)."""
    monkeypatch.setattr(fused_plan, "CALL_COST", cost)
    q, k, v, dout, cases = _pitfall_inputs()
    q_pos, k_pos, q_doc, k_doc = cases[case]
    block = (q_pos, k_pos, True, 0.7, q_doc, k_doc)
    out, lse = fused.attention_forward(q, k, v, *block)
    blind = ~blocks.visible_pairs(q_pos, k_pos, True, q_doc, k_doc).any(-1)  # (S_q,)
    assert bool(blind.any()) and bool((lse[:, :, blind] == float("-inf")).all())
    assert bool((out[:, blind] == 0).all()) and bool(torch.isfinite(lse[:, :, ~blind]).all())
    expected_out, expected_lse = blocks.attention_block(q, k, v, *block)
    assert relative_error(out, expected_out) <= TIGHT
    assert relative_error(lse, expected_lse) <= TIGHT
    grads = fused.attention_backward(dout, q, k, v, out, lse, *block)  # lse -inf: final too
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][:, blind] == 0).all())
    for got, expected in zip(grads, blocks.attention_block_backward(dout, q, k, v, out, lse,
                                                                    *block)):  # fmt: skip
        assert gradient_error(got, expected, dout) <= TIGHT


def _coverage(tasks, q_pos, k_pos, causal, q_doc, k_doc) -> torch.Tensor:
    """(S_q, S_k) how many times the tasks compute each visible pair."""
    count = torch.zeros(len(q_pos), len(k_pos), dtype=torch.long)
    for t in tasks:
        rows, keys = slice(t.q_lo, t.q_hi), slice(t.k_lo, t.k_hi)
        pairs = torch.ones(t.q_hi - t.q_lo, t.k_hi - t.k_lo, dtype=torch.long)
        if t.kind == "causal":
            pairs = pairs.tril()
        if t.kind == "masked":
            docs = (None, None) if q_doc is None else (q_doc[rows], k_doc[keys])
            pairs = blocks.visible_pairs(q_pos[rows], k_pos[keys], causal, *docs).long()
        count[rows, keys] += pairs
    return count


@given(st.one_of(layout_block(max_world=6), st.integers(1, 12).flatmap(
    lambda n: st.fixed_dictionaries(dict(q_pos=positions(n), k_pos=positions(13 - n),
                                         q_doc=st.none(), k_doc=st.none()))
)), st.booleans(), st.sampled_from([1, 10**9]))  # fmt: skip
def test_a_plan_computes_every_visible_pair_once(case, causal, work):
    """For layout blocks and arbitrary positions (repeats, any order): the tasks, whether the
    plan or its one-masked-call fallback, cover exactly the visible pairs, each once."""
    c = case
    block = (c["q_pos"], c["k_pos"], causal, c["q_doc"], c["k_doc"])
    tasks = fused_plan.plan(*block, work=work)
    visible = blocks.visible_pairs(*block).long()
    assert torch.equal(_coverage(tasks, *block), visible)


@pytest.mark.parametrize("lay", layout.LAYOUTS)
def test_layout_blocks_need_no_explicit_mask(lay):
    """At a real size (S = 4096, W = 4, B·Hq·D = 512) every ring block and the Ulysses block
    of the gathered sequence is planned with no mask (full and is_causal calls only), in at
    most 3 calls for a ring block and (2W)^2 for the gathered sequence (2W runs at most)."""
    cut = layout.all_positions(4096, world=4, layout=lay)
    pairs = [(a, b, 3) for a in cut for b in cut] + [(torch.cat(cut), torch.cat(cut), 64)]
    for q_pos, k_pos, most in pairs:
        tasks = fused_plan.plan(q_pos, k_pos, True, work=512)
        assert all(t.kind != "masked" for t in tasks) and len(tasks) <= most


def test_16_bit_inputs_compute_in_float32():
    """bfloat16 inputs give float32 results, as the block math's accumulation dtype."""
    q, k, v, _ = tensors(3, (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4))
    pos = torch.arange(8)
    out, lse = fused.attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos, pos, True,
                                       0.5)  # fmt: skip
    expected_out, _ = blocks.attention_block(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos, pos,
                                             True, 0.5)  # fmt: skip
    assert out.dtype == lse.dtype == torch.float32
    # both cast the same bfloat16 numbers up and compute in float32: float32 rounding only
    assert relative_error(out, expected_out) <= FLOAT32


def test_auto_is_fused_on_cpu_and_fused_refuses_cuda(monkeypatch):
    """resolve: "auto" on CPU tensors is "fused"; "fused" on a CUDA tensor is a ValueError with
    a sentence, and so is the fused module on one; "auto" on CUDA stays triton or torch."""
    cpu = torch.zeros(1)
    assert backends.resolve("auto", cpu) == "fused" and backends.resolve("fused", cpu) == "fused"
    assert backends.resolve("torch", cpu) == "torch"
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # no GPU needed
    with pytest.raises(ValueError, match="needs CPU tensors"):
        backends.resolve("fused", cuda)
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    assert backends.resolve("auto", cuda) == "torch"
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert backends.resolve("auto", cuda) == "triton"
    meta = torch.zeros(1, 2, 1, 4, device="meta")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        fused.attention_forward(meta, meta, meta, torch.arange(2), torch.arange(2), True, 1.0)


def test_backends_dispatch_fused():
    """backends.attention_forward / _backward with "fused" give the fused module's numbers."""
    q, k, v, dout = tensors(5, (1, 6, 2, 3), (1, 6, 1, 3), (1, 6, 1, 3), (1, 6, 2, 3))
    block = (torch.arange(6), torch.arange(6), True, 0.5)
    out, lse = backends.attention_forward("fused", q, k, v, *block)
    assert torch.equal(out, fused.attention_forward(q, k, v, *block)[0])
    grads = backends.attention_backward("fused", dout, q, k, v, out, lse, *block)
    for got, expected in zip(grads, fused.attention_backward(dout, q, k, v, out, lse, *block)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("cost", [0, fused_plan.CALL_COST])
@pytest.mark.parametrize("native", [True, False])
def test_gqa_with_and_without_the_kernels_own_support(monkeypatch, native, cost):
    """Hq = 6, Hkv = 2 (and MQA, Hkv = 1): the kernel's own GQA, or K/V heads repeated and their
    gradients summed per group (older torch), both give the block math's numbers."""
    monkeypatch.setattr(fused, "_native_gqa", lambda: native)
    monkeypatch.setattr(fused_plan, "CALL_COST", cost)
    for heads_kv in (2, 1):
        q, k, v, dout = tensors(11, (2, 9, 6, 5), (2, 7, heads_kv, 5), (2, 7, heads_kv, 5),
                                (2, 9, 6, 5))  # fmt: skip
        block = (torch.arange(2, 11), torch.arange(7), True, 0.6)
        out, lse = fused.attention_forward(q, k, v, *block)
        expected_out, expected_lse = blocks.attention_block(q, k, v, *block)
        assert relative_error(out, expected_out) <= TIGHT
        assert relative_error(lse, expected_lse) <= TIGHT
        grads = fused.attention_backward(dout, q, k, v, out, lse, *block)
        expected = blocks.attention_block_backward(dout, q, k, v, out, lse, *block)
        for got, truth in zip(grads, expected):
            assert got.shape == truth.shape and gradient_error(got, truth, dout) <= TIGHT


def test_a_block_whose_positions_do_not_match_its_tokens_is_refused():
    """A block received from the wrong rank on uneven shards holds another number of tokens than
    the positions the step expects: the kernel would compute on what the slices hold, silently,
    so the fused path refuses it (as the block math does, by its shapes)."""
    q, k, v, dout = tensors(1, (1, 5, 2, 4), (1, 4, 2, 4), (1, 4, 2, 4), (1, 5, 2, 4))
    q_pos, k_pos = torch.arange(5), torch.arange(5)  # five key positions for four keys
    with pytest.raises(ValueError, match="a block of 4 keys has 5 positions"):
        fused.attention_forward(q, k, v, q_pos, k_pos, True, 0.5)
    out, lse = torch.zeros(1, 5, 2, 4), torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="a block of 4 keys has 5 positions"):
        fused.attention_backward(dout, q, k, v, out, lse, q_pos, k_pos, True, 0.5)
