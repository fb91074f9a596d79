"""Linear-attention chunk math (sptutor.chunks) against the ground truth and autograd."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sptutor import backends, chunks, work
from sptutor.oracle import reference
from sptutor.testing import assert_close, relative_error
from tests.helpers import state_after
from tests.strategies import HEAD_DIMS, attention_inputs, decays, heads, tensors

# Everything here is float64 and the same sums reordered (errors ~1e-16); linear outputs grow with
# S, so every comparison is relative (the design's rule), with assert_close's 1e-10: far above
# rounding, far below any real mistake (a wrong decay power or a missing chunk is an O(1e-2) error).


@st.composite
def chunked_case(draw, max_chunks: int = 4, max_chunk: int = 5):
    """q, k, v, dout of a random shape, a decay, and cut points splitting S into chunks."""
    lengths = draw(st.lists(st.integers(1, max_chunk), min_size=1, max_size=max_chunks))
    seq_len, (heads_q, heads_kv) = sum(lengths), draw(heads())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    q, k, v, dout = attention_inputs(
        draw(st.integers(0, 10**6)), batch, seq_len, heads_q, heads_kv, head_dim
    )
    starts = [sum(lengths[:n]) for n in range(len(lengths) + 1)]
    parts = [slice(a, b) for a, b in itertools.pairwise(starts)]
    return dict(q=q, k=k, v=v, dout=dout, decay=draw(decays(heads_q)), chunks=parts)


def run_chain(c):
    """Chunks in sequence order, the state handed on: outputs and the state entering each chunk."""
    state, outs, states_in = None, [], []
    for part in c["chunks"]:
        states_in.append(state)
        out, state = chunks.forward(
            c["q"][:, part], c["k"][:, part], c["v"][:, part], state, c["decay"]
        )
        outs.append(out)
    return torch.cat(outs, dim=1), states_in, state


@given(chunked_case())
def test_chained_chunks_equal_full_linear_attention(case):
    """Any split into chunks, state chained: outputs and every state equal the definition."""
    out, states_in, final_state = run_chain(case)
    q, k, v, decay = case["q"], case["k"], case["v"], case["decay"]
    assert_close(out, reference.full_linear_attention(q, k, v, causal=True, decay=decay))
    for part, state in zip(case["chunks"], states_in):
        assert (state is None) == (part.start == 0)
        if state is not None:
            assert_close(state, state_after(k, v, decay, part.start, q.shape[2]))
    assert_close(final_state, state_after(k, v, decay, q.shape[1], q.shape[2]))


@given(chunked_case())
def test_chained_chunk_backward_equals_autograd_of_full_linear_attention(case):
    """dKV handed back chunk by chunk (none into the last) gives the full dq, dk, dv."""
    _, states_in, _ = run_chain(case)
    dstate, grads = None, []
    for part, state in reversed(list(zip(case["chunks"], states_in))):
        *chunk_grads, dstate = chunks.backward(
            case["dout"][:, part], dstate, case["q"][:, part], case["k"][:, part],
            case["v"][:, part], state, case["decay"],
        )  # fmt: skip
        grads.insert(0, chunk_grads)
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    reference.full_linear_attention(q, k, v, causal=True, decay=case["decay"]).backward(
        case["dout"]
    )
    for n, expected in enumerate((q.grad, k.grad, v.grad)):
        assert_close(torch.cat([g[n] for g in grads], dim=1), expected)


@given(chunked_case(max_chunks=1, max_chunk=6), st.integers(0, 99))
def test_chunk_backward_equals_autograd_including_the_states(case, seed):
    """With a state in and a dKV_out: dq, dk, dv and dKV_p0 equal autograd of the forward."""
    q, k, v, dout, decay = (case[n] for n in ("q", "k", "v", "dout", "decay"))
    batch, _, heads_q, head_dim = q.shape
    state, dstate_out = tensors(seed, *[(batch, heads_q, head_dim, head_dim)] * 2)
    grads = chunks.backward(dout, dstate_out, q, k, v, state, decay)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, state)]
    out, state_out = chunks.forward(*leaves, decay)
    torch.autograd.backward((out, state_out), (dout, dstate_out))
    for got, leaf in zip(grads, leaves):
        assert_close(got, leaf.grad)


@given(chunked_case())
def test_noncausal_pieces_equal_full_noncausal_attention(case):
    """Sum of local K^T V, read as q·KV_total; backward through the sum of Q^T dO: exact."""
    q, k, v, dout, parts = (case[n] for n in ("q", "k", "v", "dout", "chunks"))
    heads_q = q.shape[2]
    total = sum(chunks.local_state(k[:, p], v[:, p], None, heads_q=heads_q) for p in parts)
    out = torch.cat([chunks.readout(q[:, p], total, None) for p in parts], dim=1)
    dq = torch.cat([chunks.readout_backward(dout[:, p], total, None) for p in parts], dim=1)
    dtotal = sum(chunks.local_dstate(q[:, p], dout[:, p], None) for p in parts)
    dkv = [chunks.local_state_backward(dtotal, k[:, p], v[:, p], None) for p in parts]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference.full_linear_attention(*leaves, causal=False)
    expected.backward(dout)
    assert_close(out, expected.detach())
    assert_close(dq, leaves[0].grad)
    assert_close(torch.cat([g[0] for g in dkv], dim=1), leaves[1].grad)
    assert_close(torch.cat([g[1] for g in dkv], dim=1), leaves[2].grad)


def test_decay_of_one_is_no_decay_and_16_bit_inputs_accumulate_in_float32():
    """decay=ones equals decay=None exactly; float16 inputs give float32 outputs and states."""
    q, k, v = tensors(0, (1, 5, 2, 3), (1, 5, 1, 3), (1, 5, 1, 3))
    state = tensors(1, (1, 2, 3, 3))[0]
    with_ones = chunks.forward(q, k, v, state, torch.ones(2, dtype=torch.float64))
    without = chunks.forward(q, k, v, state, None)
    assert all(torch.equal(a, b) for a, b in zip(with_ones, without))
    out, state_out = chunks.forward(q.half(), k.half(), v.half(), None, None)
    assert out.dtype == state_out.dtype == torch.float32


def test_macs_count_the_matrix_products():
    """Intra counts 2·D per visible pair (as softmax blocks do); a state product counts C·D²."""
    pos = torch.arange(6)
    softmax = work.attention_macs(pos, pos, True, 2, 3, 4)
    assert work.linear_macs("intra", 2, 3, 6, 4) == softmax
    assert work.linear_macs("intra_backward", 2, 3, 6, 4) == softmax * 5 // 2
    assert work.linear_macs("readout", 2, 3, 6, 4) == 2 * 3 * 6 * 16
    assert work.linear_macs("local_state_backward", 2, 3, 6, 4) == 2 * 2 * 3 * 6 * 16
    with pytest.raises(ValueError, match="part must be"):
        work.linear_macs("inter", 1, 1, 1, 1)


@st.composite
def blocked_case(draw):
    """q, k, v, dout of one chunk of C tokens, a decay and a sub-chunk length T (any C % T)."""
    chunk, (heads_q, heads_kv) = draw(st.integers(1, 200)), draw(heads())
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    q, k, v, dout = attention_inputs(
        draw(st.integers(0, 10**6)), batch, chunk, heads_q, heads_kv, head_dim
    )
    block = draw(st.one_of(st.integers(1, 16), st.just(chunks.SUB_CHUNK)))
    return dict(q=q, k=k, v=v, dout=dout, decay=draw(decays(heads_q)), block=block)


@given(blocked_case())
def test_blocked_intra_forward_and_backward_equal_the_plain_form(case):
    """Sub-chunks with the state carried between them give the plain C×C intra output and grads."""
    q, k, v, dout, decay, block = (case[n] for n in ("q", "k", "v", "dout", "decay", "block"))
    pairs = [
        (chunks.intra_blocked(q, k, v, decay, block),
         chunks.intra(q, k, v, decay)),
        *zip(chunks.intra_backward_blocked(dout, q, k, v, decay, block),
             chunks.intra_backward(dout, q, k, v, decay)),
    ]  # fmt: skip
    for name, (blocked, plain) in zip(("out", "dq", "dk", "dv"), pairs):
        assert blocked.shape == plain.shape and blocked.dtype == plain.dtype == torch.float64
        # float64, the same sums regrouped by sub-chunk (~5e-16 observed): 1e-13 is the bound the
        # blocked form promises, and a wrong power or a lost sub-chunk is an O(1e-2) error
        assert relative_error(blocked, plain) <= 1e-13, name


def test_carry_is_a_d_by_d_step_with_decay_powers_in_the_state_dtype():
    """carry at C = 2^20 builds nothing of size C; decay^C comes from the unrounded decay."""
    decay = torch.tensor([0.9999, 0.5])  # float32; 0.9999 is 1.0 in bfloat16
    state, local = tensors(0, (1, 2, 3, 3), (1, 2, 3, 3), dtype=torch.float32)
    for length in (16384, 2**20):
        carried = chunks.carry(state, local, decay, length)
        expected = (decay.double() ** length)[:, None, None] * state.double() + local.double()
        assert carried.dtype == torch.float32
        # float32 roundoff (6e-8) on one product and one sum: 1e-5 as float32 results everywhere;
        # a decay rounded to 16 bits first would leave 1.0 instead of 0.19 for 0.9999^16384
        assert_close(carried, expected, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=10)  # the triton side runs under the interpreter: a few draws suffice
@given(case=chunked_case(max_chunks=3, max_chunk=6), reads=st.booleans(), seed=st.integers(0, 99))
def test_segmented_local_work_is_each_document_alone(backend, case, reads, seed):
    """backends' local work over segments (a chunk's runs of one document) == each segment run
    alone by chunks.forward / backward: the incoming state read by the first segment only (if
    it ``reads``), the local state the last segment's, the local dKV the first's (zero if the
    chunk reads nothing)."""
    if backend == "triton" and not backends.triton_installed():
        pytest.skip("triton is not installed")
    q, k, v, dout, decay, parts = (case[n] for n in ("q", "k", "v", "dout", "decay", "chunks"))
    batch, _, heads_q, head_dim = q.shape
    state = tensors(seed, (batch, heads_q, head_dim, head_dim))[0] if reads else None
    out, local = backends.linear_local_forward(backend, q, k, v, decay, True, tuple(parts))
    if reads:  # what the method adds once the state has arrived
        out[:, parts[0]] += chunks.readout(q[:, parts[0]], state, decay)
    grads = backends.linear_local_backward(
        backend, dout, q, k, v, state, decay, True, tuple(parts), reads
    )
    states = [state] + [None] * (len(parts) - 1)  # only the first segment reads one
    alone = [chunks.forward(q[:, p], k[:, p], v[:, p], s, decay) for p, s in zip(parts, states)]
    backs = [
        chunks.backward(dout[:, p], None, q[:, p], k[:, p], v[:, p], s, decay)
        for p, s in zip(parts, states)
    ]
    last = parts[-1]
    expected_local = chunks.local_state(k[:, last], v[:, last], decay, heads_q=heads_q)
    assert_close(out, torch.cat([o for o, _ in alone], dim=1))
    assert_close(local, expected_local)
    for n in range(3):
        assert_close(grads[n], torch.cat([b[n] for b in backs], dim=1))
    if reads:
        assert_close(grads[3], backs[0][3])
    else:
        assert torch.count_nonzero(grads[3]) == 0
