"""Real LASP and LASP-2 on 4 gloo processes == their oracle, shard by shard, message by message."""

import torch
from hypothesis import Phase, example, given, settings

import sptutor
from sptutor import launch, ledger
from sptutor.testing import Case
from tests.dist.harness import assert_real_matches_oracle, linear_cases, per_group

ALL_RANKS = (0, 1, 2, 3)
# W = 4 chains and gathers, causal with decay and GQA, and non-causal, whatever hypothesis draws
W4_CASES = [
    Case(method, ALL_RANKS, "contiguous", causal, batch=2, seq_len=8, heads_q=4, heads_kv=2,
         head_dim=5, dtype=dtype, seed=7, decay=(0.9, 0.75, 0.6, 0.99) if causal else None)
    for method in ("lasp", "lasp2") for causal in (True, False) for dtype in ("float64", "float32")
]  # fmt: skip


# Tolerances (DESIGN §7, in sptutor.testing): float64 1e-10, float32 1e-5 relative to the oracle.
# Both sides run the same block maths in the same order; only the collectives' summation order
# may differ, so errors are a few ulps.
@settings(max_examples=1, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(per_group(lambda m: linear_cases("lasp", m) | linear_cases("lasp2", m)))
@example(W4_CASES)
def test_real_lasp_and_lasp2_match_the_oracle(cases):
    """W 1..4, causal or not, decay, GQA/MQA, float64/float32: shards, ledger and saved bytes
    equal the oracle's, and bytes sent and saved per rank equal sptutor.cost."""
    assert_real_matches_oracle(cases)


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    q = torch.randn(1, 3, 2, 8)  # C = 3, Hq = 2
    decay = torch.full((2,), 0.9)
    calls = {
        "non-causal decay": dict(causal=False, decay=decay),
        "decay needs grad": dict(decay=decay.clone().requires_grad_()),
        "decay shape": dict(decay=torch.full((3,), 0.9)),
        "decay range": dict(decay=torch.full((2,), 1.5)),
        "dtype": dict(k=q.double(), v=q.double()),
        "chunk": dict(k=q[:, :2], v=q[:, :2]),
        "backend": dict(backend="triton"),
    }
    messages = {}
    with ledger.record() as led:
        for method in ("lasp", "lasp2"):
            attention = getattr(sptutor, f"{method}_attention")
            for name, options in calls.items():
                options = dict(q=q, k=q, v=q) | options
                try:
                    attention(options.pop("q"), options.pop("k"), options.pop("v"), **options)
                    messages[method, name] = None
                except (ValueError, TypeError) as error:
                    messages[method, name] = f"{type(error).__name__}: {error}"
    return messages, len(led.events)


def test_bad_input_raises_before_any_communication():
    """Bad decay, dtypes, lengths or backends raise ValueError/TypeError on every rank, sending
    nothing."""
    expected = {
        "non-causal decay": "ValueError: decay needs causal=True",
        "decay needs grad": "ValueError: decay must not require grad",
        "decay shape": "ValueError: decay must have shape (Hq,) = (2,), got (3,)",
        "decay range": "ValueError: decay must lie in (0, 1], got min=1.5, max=1.5",
        "dtype": "TypeError: q, k, v need one floating dtype",
        "chunk": "ValueError: q and k must have one sequence length, got 3 and 2",
        "backend": "ValueError: backend='triton' needs the Triton kernels",
    }
    for messages, events in launch.spawn(_bad_calls, 4):
        assert events == 0
        for (method, name), message in messages.items():
            assert message is not None, f"{method}: {name} did not raise"
            assert message.startswith(expected[name]), f"{method}: {message}"
