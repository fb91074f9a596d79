"""The ground truth against the most direct computation there is: one row at a time."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor.checks import check_qkv
from sptutor.oracle import reference
from tests.strategies import heads, positions, tensors


def attention_row_by_row(q, k, v, causal, scale, q_pos, k_pos):
    """Softmax attention with Python loops over batch, head and query (float64)."""
    batch, seq_q, heads_q, _ = q.shape
    group = heads_q // k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads_q, seq_q), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            for i in range(seq_q):
                keys = [j for j in range(k.shape[1]) if not causal or q_pos[i] >= k_pos[j]]
                if not keys:
                    continue
                scores = [scale * float(q[b, i, h] @ k[b, j, h // group]) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                lse[b, h, i] = top + math.log(total)
                for w, j in zip(weights, keys):
                    out[b, i, h] += w / total * v[b, j, h // group]
    return out, lse


@given(
    st.integers(1, 2),
    st.integers(1, 6),
    st.integers(1, 6),
    heads(),
    st.sampled_from([1, 3, 8]),
    st.booleans(),
    st.data(),
)
def test_full_attention_matches_row_by_row_softmax(
    batch, seq_q, seq_k, hq_hkv, head_dim, causal, data
):
    """full_attention == per-row softmax, with positions, GQA/MQA and rows that see no key."""
    heads_q, heads_kv = hq_hkv
    q, k, v = tensors(
        seq_q * 7 + seq_k,
        (batch, seq_q, heads_q, head_dim),
        (batch, seq_k, heads_kv, head_dim),
        (batch, seq_k, heads_kv, head_dim),
    )
    q_pos, k_pos = data.draw(positions(seq_q, 8)), data.draw(positions(seq_k, 8))
    scale = data.draw(st.floats(0.1, 2.0))
    out, lse = reference.full_attention(
        q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos
    )
    expected_out, expected_lse = attention_row_by_row(q, k, v, causal, scale, q_pos, k_pos)
    # same math in float64, summed in another order: agreement to a few ulps
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_empty_rows_and_default_scale():
    """A query before every key gets out 0 and lse -inf; scale defaults to D ** -0.5."""
    q, k, v = tensors(0, (1, 2, 1, 4), (1, 3, 1, 4), (1, 3, 1, 4))
    out, lse = reference.full_attention(
        q, k, v, causal=True, q_pos=torch.tensor([0, 5]), k_pos=torch.tensor([1, 2, 3])
    )
    assert torch.equal(out[:, 0], torch.zeros(1, 1, 4, dtype=torch.float64))
    assert lse[0, 0, 0] == -math.inf
    explicit, _ = reference.full_attention(q, k, v, scale=0.5)
    default, _ = reference.full_attention(q, k, v)
    assert torch.equal(explicit, default)


def test_lse_dtype_follows_design():
    """lse is float32 for 16/32-bit inputs and float64 for float64 inputs."""
    q, k, v = tensors(1, (1, 3, 2, 4), (1, 3, 2, 4), (1, 3, 2, 4), dtype=torch.float16)
    assert reference.full_attention(q, k, v)[1].dtype == torch.float32
    assert reference.full_attention(q.double(), k.double(), v.double())[1].dtype == torch.float64


def linear_attention_by_recurrence(q, k, v, decay):
    """o_i = q_i KV_i with KV_i = decay KV_{i-1} + k_i^T v_i (the design's state)."""
    batch, seq_len, heads_q, head_dim = q.shape
    group = heads_q // k.shape[2]
    out = torch.zeros_like(q)
    for h in range(heads_q):
        state = torch.zeros(batch, head_dim, head_dim, dtype=q.dtype)
        rate = 1.0 if decay is None else float(decay[h])
        for i in range(seq_len):
            state = rate * state + k[:, i, h // group, :, None] * v[:, i, h // group, None, :]
            out[:, i, h] = torch.einsum("bd,bde->be", q[:, i, h], state)
    return out


@given(
    st.integers(1, 2),
    st.integers(1, 9),
    heads(),
    st.sampled_from([1, 3, 8]),
    st.booleans(),
    st.data(),
)
def test_full_linear_attention_matches_the_recurrence(
    batch, seq_len, hq_hkv, head_dim, use_decay, data
):
    """Causal linear attention with per-head decay == the token-by-token state recurrence."""
    heads_q, heads_kv = hq_hkv
    q, k, v = tensors(
        seq_len,
        (batch, seq_len, heads_q, head_dim),
        (batch, seq_len, heads_kv, head_dim),
        (batch, seq_len, heads_kv, head_dim),
    )
    decay = None
    if use_decay:
        decay = torch.tensor(
            data.draw(st.lists(st.floats(0.5, 1.0), min_size=heads_q, max_size=heads_q)),
            dtype=torch.float64,
        )
    out = reference.full_linear_attention(q, k, v, causal=True, decay=decay)
    expected = linear_attention_by_recurrence(q, k, v, decay)
    # float64, relative to the output's scale (linear attention outputs grow with S)
    assert torch.linalg.vector_norm(out - expected) <= 1e-12 * torch.linalg.vector_norm(expected)


def test_non_causal_linear_attention_uses_one_global_state():
    """Non-causal: o_i = q_i (sum_j k_j^T v_j), the same state for every query."""
    q, k, v = tensors(3, (2, 5, 2, 3), (2, 5, 1, 3), (2, 5, 1, 3))
    state = torch.einsum("bshd,bshe->bhde", k, v)  # (B, 1, D, D)
    expected = torch.einsum("bshd,bhde->bshe", q, state.expand(-1, 2, -1, -1))
    torch.testing.assert_close(reference.full_linear_attention(q, k, v, causal=False), expected)


@pytest.mark.parametrize(
    ("decay", "causal", "message"),
    [
        (torch.ones(2), False, "decay needs causal=True"),
        (torch.ones(2, requires_grad=True), True, "decay must not require grad"),
        (torch.ones(3), True, r"decay must have shape \(Hq,\) = \(2,\), got \(3,\)"),
        (torch.tensor([0.5, 1.5]), True, "decay must lie in \\(0, 1\\], got min=0.5, max=1.5"),
    ],
)
def test_bad_decay_raises(decay, causal, message):
    """decay: only with causal, never trainable, shape (Hq,), values in (0, 1]."""
    q, k, v = tensors(0, (1, 4, 2, 3), (1, 4, 2, 3), (1, 4, 2, 3))
    with pytest.raises(ValueError, match=message):
        reference.full_linear_attention(q, k, v, causal=causal, decay=decay)


def test_heads_that_do_not_group_raise():
    """Hq % Hkv != 0 is a ValueError with both numbers."""
    q, k, v = tensors(0, (1, 4, 3, 3), (1, 4, 2, 3), (1, 4, 2, 3))
    with pytest.raises(ValueError, match="Hq=3, Hkv=2"):
        reference.full_attention(q, k, v)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            dict(q=torch.zeros(4, 2, 3)),
            ValueError,
            r"q must be \(B, S, H, D\), got shape \(4, 2, 3\)",
        ),
        (
            dict(k=torch.zeros(1, 6, 2, 4).double(), v=torch.zeros(1, 6, 2, 4).double()),
            ValueError,
            "agree on B and D",
        ),
        (dict(v=torch.zeros(1, 6, 2, 3, dtype=torch.float32)), TypeError, "one floating dtype"),
        (dict(q_pos=torch.arange(3)), ValueError, r"q_pos must have shape \(4,\).*got \(3,\)"),
        (dict(k_pos=torch.arange(7)), ValueError, r"k_pos must have shape \(6,\).*got \(7,\)"),
        (dict(q_pos=torch.zeros(4)), TypeError, "q_pos must be an integer torch.Tensor"),
    ],
)
def test_full_attention_refuses_bad_input_with_the_numbers(changes, error, message):
    """The ground truth checks its own inputs (S_q != S_k allowed; causal or not, a position
    vector of the wrong length is an error), naming the shapes, before any einsum."""
    inputs = dict(
        q=torch.zeros(1, 4, 2, 3, dtype=torch.float64),
        k=torch.zeros(1, 6, 2, 3, dtype=torch.float64),
        v=torch.zeros(1, 6, 2, 3, dtype=torch.float64),
    )
    inputs.update(changes)
    with pytest.raises(error, match=message):
        reference.full_attention(**inputs)
    assert reference.full_attention(*tensors(0, (1, 4, 2, 3), (1, 6, 1, 3), (1, 6, 1, 3)))


def test_a_decay_on_another_device_or_of_integers_is_a_type_error():
    """decay must be a floating tensor on q's device: a CUDA q with a CPU decay would fail in
    the middle of a chain while the peers wait."""
    q, k, v = tensors(0, (1, 4, 2, 3), (1, 4, 2, 3), (1, 4, 2, 3))
    cases = [(torch.ones(2, device="meta"), "decay must be on q's device cpu"),
             (torch.ones(2, dtype=torch.int64), "decay must be a floating")]  # fmt: skip
    for decay, message in cases:
        with pytest.raises(TypeError, match=message):
            reference.full_linear_attention(q, k, v, causal=True, decay=decay)


def test_nan_or_inf_inputs_are_errors_when_asked_for(monkeypatch):
    """SPTUTOR_CHECK_FINITE=1 (on in these tests) turns a NaN or inf input into a ValueError that
    counts them; unset, the check costs nothing and lets them through."""
    q, k, v = tensors(0, (1, 4, 2, 3), (1, 4, 2, 3), (1, 4, 2, 3))
    k[0, 1, 0, 2] = float("nan")
    monkeypatch.setenv("SPTUTOR_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"k holds 1 NaN or inf value\(s\) of 24"):
        reference.full_attention(q, k, v)
    monkeypatch.setenv("SPTUTOR_CHECK_FINITE", "0")
    assert torch.isnan(reference.full_attention(q, k, v)[0]).any()


def test_heads_and_sequence_swapped_are_named_as_a_likely_cause():
    """(B, H, S, D) tensors with Hq != Hkv give q and k different "lengths"; the error says that
    sptutor takes (B, S, H, D)."""
    q, k, v = tensors(0, (1, 4, 8, 3), (1, 2, 8, 3), (1, 2, 8, 3))  # (B, H, S, D) by mistake
    with pytest.raises(ValueError, match=r"got 4 and 2; if these are \(B, H, S, D\) tensors"):
        check_qkv(q, k, v)
