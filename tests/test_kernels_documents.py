"""Packed documents in the FlashAttention kernels: per-token document ids next to positions.

Ground truth is ``oracle.full_attention(..., cu_seqlens=...)`` in float64 (gradients by autograd);
the kernels get the ids ``layout.document_ids(cu_seqlens, pos)``, and padding tokens (id -1)
appended at the end of a block, which the ground truth never sees: their rows must come out 0
(lse -inf, dq 0) and their keys get dk = dv = 0, exactly. Shapes stay small, as in
tests/test_kernels.py (16 x 16 tiles under the interpreter).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sptutor import blocks, kernels, layout
from sptutor.kernels import _tiles
from sptutor.testing import assert_close, assert_no_worse_than_baseline
from tests.strategies import positions, scales, tensors
from tests.test_kernels import (
    DEVICE,
    ILL_CONDITIONED,
    SMALL_TILES,
    assert_gradient_close,
    cancellation,
    full_attention_with_grads,
    on_device,
    poisoned_empty,
    sees_two_keys,
)

TILE = SMALL_TILES.block_m  # 16: boundaries at 15, 16, 17, 32 sit on and beside tile edges


@st.composite
def documents(draw, seq_len: int) -> torch.Tensor:
    """cu_seqlens (N+1,) over ``seq_len`` tokens: boundaries anywhere, on tile edges, repeated
    (empty documents), or none (one document spanning everything)."""
    if draw(st.integers(0, 3)) == 0:  # a quarter of the cases: one document, ids all 0
        return torch.tensor([0, seq_len])
    edges = [e for e in (15, TILE, 17, 2 * TILE) if e <= seq_len]
    inner = st.one_of(st.integers(0, seq_len), st.sampled_from([0, seq_len, *edges]))
    return torch.tensor([0, *sorted(draw(st.lists(inner, min_size=1, max_size=8))), seq_len])


@st.composite
def block_positions(draw, seq_len: int) -> torch.Tensor:
    """The global positions of one block: a slice of the sequence, or one rank's shard under a
    layout (q and k drawn apart, so q_pos != k_pos, as in a ring step)."""
    kind = draw(st.sampled_from(("slice", *layout.LAYOUTS)))
    most = seq_len // 2 if kind == "zigzag" else seq_len  # zigzag needs S >= 2W
    if kind == "slice" or most < 1:
        start = draw(st.integers(0, seq_len - 1))
        return torch.arange(start, draw(st.integers(start + 1, seq_len)))
    world = draw(st.integers(1, min(3, most)))
    return layout.positions(seq_len, world=world, rank=draw(st.integers(0, world - 1)), layout=kind)


@st.composite
def document_case(draw):
    """float64 inputs of the valid tokens (q, k, v, dout, positions, ids, cu_seqlens) and how
    many padding tokens (id -1, positions anywhere) follow them in q and in k."""
    heads_kv = draw(st.integers(1, 2))
    heads_q = heads_kv * draw(st.integers(1, 2))  # MHA, GQA
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from((1, 3, 8, 24, 40)))
    seq_len = draw(st.integers(1, 48))
    cu = draw(documents(seq_len))
    q_pos, k_pos = draw(block_positions(seq_len)), draw(block_positions(seq_len))
    q_shape = (batch, len(q_pos), heads_q, head_dim)
    kv_shape = (batch, len(k_pos), heads_kv, head_dim)
    q, k, v, dout = tensors(draw(st.integers(0, 10**6)), q_shape, kv_shape, kv_shape, q_shape)
    scale = draw(scales(head_dim))
    return dict(q=q, k=k, v=v, dout=dout, q_pos=q_pos, k_pos=k_pos, cu_seqlens=cu,
                q_doc=layout.document_ids(cu, q_pos), k_doc=layout.document_ids(cu, k_pos),
                causal=draw(st.booleans()), scale=head_dim**-0.5 if scale is None else scale,
                pad_q=draw(st.integers(0, 6)), pad_k=draw(st.integers(0, 6)),
                pad_pos=draw(positions(12, seq_len + 4)))  # fmt: skip


def padded(x: torch.Tensor, count: int, value: float = 0.0, dim: int = 1) -> torch.Tensor:
    """x followed by ``count`` entries of ``value`` along ``dim``."""
    shape = list(x.shape)
    shape[dim] = count
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=dim)


def masks_with_padding(c) -> dict:
    """The kernels' q_pos, k_pos, q_doc, k_doc: the valid tokens', then the padding's (id -1)."""
    pad_q, pad_k, pad_pos = c["pad_q"], c["pad_k"], c["pad_pos"]
    return dict(
        q_pos=torch.cat([c["q_pos"], pad_pos[:pad_q]]),
        k_pos=torch.cat([c["k_pos"], pad_pos[pad_q : pad_q + pad_k]]),
        q_doc=padded(c["q_doc"], pad_q, -1, dim=0),
        k_doc=padded(c["k_doc"], pad_k, -1, dim=0),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=20)
@given(case=document_case())
def test_documents_and_padding_match_the_float64_ground_truth(dtype, case):
    """out, lse, dq, dk, dv with packed documents (any boundaries, empty and one-token documents,
    causal or not, GQA, odd D, q and k from different slices) equal full attention per document;
    padding rows get out 0, lse -inf, dq 0 and padding keys dk = dv = 0, exactly."""
    c = case
    pad_q, pad_k = c["pad_q"], c["pad_k"]
    options = dict(q_pos=c["q_pos"], k_pos=c["k_pos"], causal=c["causal"], scale=c["scale"])
    truth = full_attention_with_grads(c["q"], c["k"], c["v"], c["dout"], cu_seqlens=c["cu_seqlens"],
                                      **options)  # fmt: skip
    out_arg, lse_arg = padded(truth[0], pad_q), padded(truth[1], pad_q, float("-inf"), dim=2)
    q, dout = (padded(c[name], pad_q, 1.0) for name in ("q", "dout"))  # padding: any values
    k, v = (padded(c[name], pad_k, 1.0) for name in ("k", "v"))
    kernel_options = dict(**masks_with_padding(c), causal=c["causal"], scale=c["scale"])
    inputs = on_device(dout, q, k, v, out_arg, lse_arg, dtype=dtype)
    with poisoned_empty():
        out, lse = kernels.flash_attention_forward(*inputs[1:4], **kernel_options)
        grads = kernels.flash_attention_backward(*inputs, **kernel_options)
    seq_q, seq_k = len(c["q_pos"]), len(c["k_pos"])
    rows, keys = slice(seq_q, None), slice(seq_k, None)  # the padding
    assert torch.equal(out[:, rows].cpu(), torch.zeros_like(out[:, rows].cpu()))
    assert bool((lse[..., rows] == float("-inf")).all())
    for got, part in zip(grads, (rows, keys, keys)):
        assert torch.equal(got[:, part].cpu(), torch.zeros_like(got[:, part].cpu()))
    # the valid tokens, as tests/test_kernels.py judges them: float64 the same math reordered
    # (the design's 1e-10); float32 exact fp32 products and sums over at most 54 terms (D <= 40,
    # S_k <= 54), well inside 1e-5, except where dq, dk cancel (ill-conditioned): there no worse
    # than torch's block math in float32
    assert_close(out[:, :seq_q], truth[0], dtype=dtype, what="out")
    assert_close(lse[..., :seq_q], truth[1], dtype=dtype, what="lse")
    block_args = (c["q_pos"], c["k_pos"], c["causal"], c["scale"], c["q_doc"], c["k_doc"])
    low = (x.to(dtype) for x in (c["dout"], c["q"], c["k"], c["v"], truth[0], truth[1]))
    torch_grads = blocks.attention_block_backward(*low, *block_args)
    names, cuts = ("dq", "dk", "dv"), (slice(0, seq_q), slice(0, seq_k), slice(0, seq_k))
    for name, got, cut, want, torch_got in zip(names, grads, cuts, truth[2:], torch_grads):
        if name == "dv":
            assert_close(got[:, cut], want, dtype=dtype, what=name)
        elif sees_two_keys(c):
            cancels = dtype == torch.float32 and cancellation(c, name, want) > ILL_CONDITIONED
            assert_gradient_close(got[:, cut], want, torch_got, dtype=dtype, what=name,
                                  cancels=cancels)  # fmt: skip


@settings(max_examples=40)
@given(case=document_case(), block_m=st.sampled_from((1, 4, 16)), block_n=st.sampled_from((1, 16)))
def test_the_schedule_never_skips_a_visible_pair(case, block_m, block_n):
    """Every (query, key) pair that attends lies in a tile pair both schedules visit, and a tile
    of padding only visits nothing (the document ranges are conservative)."""
    m = masks_with_padding(case)
    visible = blocks.visible_pairs(m["q_pos"], m["k_pos"], case["causal"], m["q_doc"], m["k_doc"])
    q_pos, k_pos = (_tiles.positions(m[n], len(m[n]), "cpu") for n in ("q_pos", "k_pos"))
    q_doc, k_doc = _tiles.documents(m["q_doc"], m["k_doc"], len(q_pos), len(k_pos), "cpu")
    schedules = [
        _tiles.tile_schedule(q_pos, k_pos, case["causal"], block_m, block_n, q_doc=q_doc,
                             k_doc=k_doc, by_key=by_key)
        for by_key in (False, True)
    ]  # fmt: skip
    visits = [{(t, int(j)) for t, n in enumerate(counts) for j in tiles[t, :n]}
              for counts, tiles in schedules]  # fmt: skip
    for i, j in visible.nonzero().tolist():
        assert (i // block_m, j // block_n) in visits[0], (i, j)
        assert (j // block_n, i // block_m) in visits[1], (i, j)
    for (counts, _), doc, block in zip(schedules, (q_doc, k_doc), (block_m, block_n)):
        padding_only = (padded(doc, -len(doc) % block, -1, dim=0).view(-1, block) < 0).all(1)
        assert not counts[padding_only].any()


DOCUMENT_TILES = {
    # two documents, one per tile: block-diagonal, each query tile skips the other key tile
    "block-diagonal": ([0] * 16 + [1] * 16, [0] * 16 + [1] * 16, [(0, 1), (1, 0)]),
    # the second tile all padding: never loaded, and its rows see nothing
    "padding tile": (
        [0] * 10 + [1] * 6 + [-1] * 16,
        [0] * 10 + [1] * 6 + [-1] * 16,
        [(0, 1), (1, 0), (1, 1)],
    ),
    # query tile 1 holds ids {3, -1}: its range ignores the padding, [3, 3], so key tile 0
    # (id 0) is skipped; a range from -1 would overlap it
    "padding in the range": (
        [2] * 16 + [3] * 10 + [-1] * 6,
        [0] * 16 + [3] * 16,
        [(1, 0), (0, 0), (0, 1)],
    ),
}


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("name", DOCUMENT_TILES)
def test_tile_pairs_without_a_shared_document_are_never_loaded(name):
    """Not causal, 16-token tiles: for each (query tile, key tile) pair whose documents differ,
    NaN in that key tile leaves the query tile's out and dq finite and correct, and NaN in that
    query tile (q, dout) leaves the key tile's dk, dv finite and correct: neither was loaded."""
    q_ids, k_ids, skipped = DOCUMENT_TILES[name]
    q_doc, k_doc = torch.tensor(q_ids), torch.tensor(k_ids)
    q, k, v, dout = tensors(8, (1, 32, 2, 8), (1, 32, 1, 8), (1, 32, 1, 8), (1, 32, 2, 8))
    pos, scale = torch.arange(32), 8**-0.5
    out, lse = blocks.attention_block(q, k, v, pos, pos, False, scale, q_doc, k_doc)
    expected = blocks.attention_block_backward(dout, q, k, v, out, lse, pos, pos, False, scale,
                                               q_doc, k_doc)  # fmt: skip
    q, k, v, dout, out, lse = on_device(q, k, v, dout, out, lse, dtype=torch.float64)
    options = dict(q_doc=q_doc, k_doc=k_doc, config=SMALL_TILES)
    for q_tile, k_tile in skipped:
        rows, keys = slice(16 * q_tile, 16 * q_tile + 16), slice(16 * k_tile, 16 * k_tile + 16)
        k_bad, v_bad, q_bad, dout_bad = k.clone(), v.clone(), q.clone(), dout.clone()
        k_bad[:, keys], v_bad[:, keys] = float("nan"), float("nan")
        q_bad[:, rows], dout_bad[:, rows] = float("nan"), float("nan")
        got_out, _ = kernels.flash_attention_forward(q, k_bad, v_bad, **options)
        got_dq = kernels.flash_attention_backward(dout, q, k_bad, v_bad, out, lse, **options)[0]
        _, got_dk, got_dv = kernels.flash_attention_backward(dout_bad, q_bad, k, v, out, lse,
                                                             **options)  # fmt: skip
        # float64, the same math: the design's 1e-10 (exact zeros where nothing is seen); a
        # visited poisoned tile would give NaN
        where = f"query tile {q_tile}, key tile {k_tile}"
        assert_close(got_out[:, rows], out[:, rows], what=f"out, {where}")
        for got, want, part, what in zip((got_dq, got_dk, got_dv), expected, (rows, keys, keys),
                                         ("dq", "dk", "dv")):  # fmt: skip
            assert_close(got[:, part], want[:, part], what=f"{what}, {where}")


def test_float16_with_documents_is_no_worse_than_plain_attention_in_float16():
    """fp16, causal, GQA, a ring step (zigzag W=2: rank 1's queries, rank 0's keys), documents
    with boundaries on and beside tile edges: within 2x (3x for gradients) the error of plain
    torch attention in fp16 against the float64 truth (the design's 16-bit rule)."""
    seq_len, heads_q, heads_kv, head_dim = 96, 4, 2, 40  # 48 tokens a rank: partial tiles
    cu = torch.tensor([0, 5, 16, 16, 33, 60, 61, 96])
    q_pos = layout.positions(seq_len, world=2, rank=1, layout="zigzag")
    k_pos = layout.positions(seq_len, world=2, rank=0, layout="zigzag")
    q_shape, kv_shape = (2, 48, heads_q, head_dim), (2, 48, heads_kv, head_dim)
    q, k, v, dout = tensors(9, q_shape, kv_shape, kv_shape, q_shape)
    options = dict(q_pos=q_pos, k_pos=k_pos, causal=True)
    truth = full_attention_with_grads(q, k, v, dout, cu_seqlens=cu, **options)
    low = [x.half() for x in (q, k, v, dout)]
    baseline = full_attention_with_grads(*low, cu_seqlens=cu, **options)
    docs = dict(q_doc=layout.document_ids(cu, q_pos), k_doc=layout.document_ids(cu, k_pos))
    q16, k16, v16, dout16 = on_device(q, k, v, dout, dtype=torch.float16)
    out, lse = kernels.flash_attention_forward(q16, k16, v16, **options, **docs)
    grads = kernels.flash_attention_backward(dout16, q16, k16, v16, out, lse, **options, **docs)
    for name, got, base, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                     baseline, truth):  # fmt: skip
        kind = "gradient" if name.startswith("d") else "output"
        assert_no_worse_than_baseline(got.cpu(), base, want, kind=kind, what=name)


def test_bad_document_ids_raise_before_any_launch():
    """One side's ids only, wrong shapes and non-integer ids raise, forward and backward."""
    q = torch.zeros(1, 4, 2, 8, device=DEVICE)
    lse = torch.zeros(1, 2, 4, device=q.device)
    ids = torch.zeros(4, dtype=torch.long)

    def both(**docs):
        yield lambda: kernels.flash_attention_forward(q, q, q, **docs)
        yield lambda: kernels.flash_attention_backward(q, q, q, q, q, lse, **docs)

    cases = [
        (ValueError, "or neither", dict(q_doc=ids)),
        (ValueError, "or neither", dict(k_doc=ids)),
        (ValueError, r"k_doc must have shape \(4,\)", dict(q_doc=ids, k_doc=ids[:3])),
        (ValueError, r"q_doc must have shape \(4,\)", dict(q_doc=ids[None], k_doc=ids)),
        (TypeError, "integer tensor", dict(q_doc=ids.float(), k_doc=ids)),
        (TypeError, "integer tensor", dict(q_doc=ids, k_doc=ids.bool())),
    ]
    for error, message, docs in cases:
        for call in both(**docs):
            with pytest.raises(error, match=message):
                call()
