"""The linear-attention kernels (sptutor.kernels) against sptutor.chunks' chunk math and the
ground truth (the design's state convention, Design, *Linear attention*).

Without CUDA they run under the Triton interpreter with 16-token sub-chunks, so a chunk of up to
40 tokens already carries the state across sub-chunks, with a partial last one.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sptutor import chunks, kernels
from sptutor.oracle import reference
from sptutor.testing import assert_close, assert_no_worse_than_baseline
from tests.helpers import state_after
from tests.strategies import decays, tensors
from tests.test_kernels import DEVICE, on_device, poisoned_empty


@st.composite
def linear_case(draw):
    """float64 q, k, v, dout of a chunk, a state in and a dstate out (or None), causal, decay."""
    heads_kv = draw(st.integers(1, 2))  # few heads: the interpreter runs one program per head
    heads_q = heads_kv * draw(st.integers(1, 3))  # MHA, GQA, MQA
    batch, seq_len = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    head_dim = draw(st.sampled_from((1, 3, 8, 24, 40)))
    causal = draw(st.booleans())
    q_shape, kv_shape = (batch, seq_len, heads_q, head_dim), (batch, seq_len, heads_kv, head_dim)
    state_shape = (batch, heads_q, head_dim, head_dim)
    q, k, v, dout, state, dstate_out = tensors(
        draw(st.integers(0, 10**6)), q_shape, kv_shape, kv_shape, q_shape, state_shape, state_shape
    )
    return dict(q=q, k=k, v=v, dout=dout, causal=causal,
                decay=draw(decays(heads_q)) if causal else None,
                state=state if draw(st.booleans()) else None,
                dstate_out=dstate_out if draw(st.booleans()) else None)  # fmt: skip


def expected_chunk(c):
    """out, state_out, dq, dk, dv, dstate_in of the chunk, by sptutor.chunks in float64."""
    q, k, v, dout, state, dstate_out = (
        c[n] for n in ("q", "k", "v", "dout", "state", "dstate_out")
    )
    if c["causal"]:
        out, state_out = chunks.forward(q, k, v, state, c["decay"])
        grads = chunks.backward(dout, dstate_out, q, k, v, state, c["decay"])
        return out, state_out, *grads
    # non-causal: the queries read the state plus the chunk's own K^T V (kernels' docstring)
    local = chunks.local_state(k, v, None, heads_q=q.shape[2])
    total = local if state is None else state + local
    dtotal = chunks.local_dstate(q, dout, None)
    dtotal = dtotal if dstate_out is None else dtotal + dstate_out
    dk, dv = chunks.local_state_backward(dtotal, k, v, None)
    dq = chunks.readout_backward(dout, total, None)
    return chunks.readout(q, total, None), total, dq, dk, dv, dtotal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=5)
@given(case=linear_case())
def test_forward_and_backward_equal_the_float64_chunk_math(dtype, case):
    """out, KV_out, dq, dk, dv, dKV_p0 equal chunks.forward/backward (with and without a
    decay, state in, dstate out; causal and not; GQA/MQA); every output element is written."""
    c = case
    q, k, v, dout = on_device(c["q"], c["k"], c["v"], c["dout"], dtype=dtype)
    state, dstate_out, decay = (
        None if c[n] is None else c[n].to(device=DEVICE, dtype=dtype)
        for n in ("state", "dstate_out", "decay")
    )
    options = dict(state=state, decay=decay, causal=c["causal"])
    with poisoned_empty():
        got = kernels.linear_attention_forward(q, k, v, **options)
        got += kernels.linear_attention_backward(dout, q, k, v, dstate_out=dstate_out, **options)
    # float64: the same sums reordered (1e-10); float32: exact fp32 products, sums of <= 40 terms
    # per sub-chunk and state, relative to the (growing) output scale: the design's 1e-5
    names = ("out", "state_out", "dq", "dk", "dv", "dstate")
    for name, result, want in zip(names, got, expected_chunk(c)):
        assert_close(result, want, dtype=dtype, what=name)


@settings(max_examples=3)
@given(case=linear_case(), cut=st.integers(0, 40))
def test_chained_chunks_equal_full_linear_attention(case, cut):
    """Two chunks, the first's KV_out handed to the second as its state (LASP's message): the
    outputs and the final state equal the definition over the whole sequence, in float64."""
    q, k, v, decay = (case[n] for n in ("q", "k", "v", "decay"))
    cut = min(cut, q.shape[1])
    head_count, state, outs = q.shape[2], None, []
    for part in (slice(0, cut), slice(cut, None)):
        if q[:, part].shape[1] == 0:
            continue
        out, state = kernels.linear_attention_forward(
            *on_device(q[:, part], k[:, part], v[:, part], dtype=torch.float64),
            state=state, decay=None if decay is None else decay.to(DEVICE), causal=True,
        )  # fmt: skip
        outs.append(out.cpu())
    # float64, the same sums reordered: the design's float64 tolerance (1e-10)
    assert_close(torch.cat(outs, dim=1), reference.full_linear_attention(q, k, v, decay=decay))
    assert_close(state.cpu(), state_after(k, v, decay, q.shape[1], head_count))


@pytest.mark.parametrize("with_decay", [False, True])
def test_float16_chunk_with_a_state_is_no_worse_than_plain_linear_attention(with_decay):
    """A 48-token fp16 chunk after a 32-token prefix (its state in float32, as a previous chunk
    hands it on): out and dq, dk, dv vs float64 truth within 2x (3x for gradients) the error of
    plain torch linear attention over the whole sequence in fp16 (the design's 16-bit rule)."""
    prefix, length, heads_q, heads_kv, head_dim = 32, 48, 4, 2, 24
    q_shape = (2, prefix + length, heads_q, head_dim)
    kv_shape = (2, prefix + length, heads_kv, head_dim)
    q, k, v, dout = (x * 0.5 for x in tensors(8, q_shape, kv_shape, kv_shape, q_shape))
    decay = torch.linspace(0.9, 0.99, heads_q, dtype=torch.float64) if with_decay else None
    chunk = slice(prefix, None)

    def with_grads(q, k, v, dout, decay):
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        out = reference.full_linear_attention(q, k, v, causal=True, decay=decay)
        out.backward(dout)
        return out.detach()[:, chunk], q.grad[:, chunk], k.grad[:, chunk], v.grad[:, chunk]

    truth = with_grads(q, k, v, dout, decay)
    baseline = with_grads(q.half(), k.half(), v.half(), dout.half(),
                          None if decay is None else decay.half())  # fmt: skip
    state = state_after(k, v, decay, prefix, heads_q).float().to(DEVICE)
    q16, k16, v16, dout16 = on_device(q[:, chunk], k[:, chunk], v[:, chunk], dout[:, chunk],
                                      dtype=torch.float16)  # fmt: skip
    decay16 = None if decay is None else decay.to(device=DEVICE, dtype=torch.float16)
    options = dict(state=state, decay=decay16, causal=True)
    out, _ = kernels.linear_attention_forward(q16, k16, v16, **options)
    # no later chunk: dKV_out = 0, as the truth's sequence ends with this chunk
    dq, dk, dv, _ = kernels.linear_attention_backward(dout16, q16, k16, v16, **options)
    for name, got, base, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), baseline, truth):
        kind = "output" if name == "out" else "gradient"
        assert_no_worse_than_baseline(got.cpu(), base, want, kind=kind, what=name)


def test_decay_rules_are_checked():
    """decay only causal, in (0, 1], shape (Hq,), not requiring grad; states must be (B,Hq,D,D)."""
    q = torch.zeros(1, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="decay needs causal=True"):
        kernels.linear_attention_forward(q, q, q, decay=torch.ones(2), causal=False)
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
        kernels.linear_attention_forward(q, q, q, decay=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="state must be"):
        kernels.linear_attention_forward(q, q, q, state=torch.zeros(1, 1, 8, 8, device=DEVICE))
