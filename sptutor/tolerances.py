"""The tolerance rule (see Design, *Tolerances*) in one place, for sptutor's tests and yours.

Every comparison in sptutor is *relative to the scale of the expected tensor*
(``‖actual − expected‖ / ‖expected‖``): linear-attention outputs grow with the sequence, softmax
outputs do not, and one rule must serve both. A gradient's scale is at least ``‖dout‖`` of the
rank's rows (:func:`gradient_floor`): gradients can be exactly zero, and rounding is not.

- float64 vs float64: the same math reordered, so the error is a few ulps times a small growth
  factor; ``1e-10`` leaves four orders of magnitude of headroom over the ~1e-15 we observe and is
  still far below any real bug (a wrong mask or a missing block gives errors of 1e-2 or more).
- float32 vs a float64 oracle: float32 has ~6e-8 unit roundoff; sums over a few thousand terms
  stay below ``1e-5``.
- float16 / bfloat16: no fixed number is honest (it depends on S, D and the data), so the error
  must be at most 2× (3× for gradients) that of plain torch attention computed in the same dtype
  against the same float64 truth: "no worse than the naive baseline". A baseline that overflowed
  (inf or NaN) bounds nothing and is refused, never passed.
- real code vs the oracle run on the same 16-bit inputs: the same block math on both sides, so
  they agree to one unit in the last place of the 16-bit result (:func:`oracle_tolerance`).

``sptutor.testing`` re-exports these names beside the oracle API that uses them.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
BASELINE_FACTOR = {"output": 2.0, "gradient": 3.0}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """``‖actual − expected‖ / max(‖expected‖, floor)`` in float64 (absolute when both are 0).

    Entries where both tensors hold the same infinity (an LSE of -inf for a row that sees no key)
    count as equal; an infinity on one side only makes the error infinite. ``floor``: the least
    scale to judge against, for tensors that can be exactly zero (:func:`gradient_floor`).
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_infinity = torch.isinf(expected) & (actual == expected)
    if bool((torch.isinf(actual) | torch.isinf(expected))[~same_infinity].any()):
        return float("inf")
    actual, expected = actual[~same_infinity], expected[~same_infinity]
    scale = max(torch.linalg.vector_norm(expected).item(), floor)
    difference = torch.linalg.vector_norm(actual - expected).item()
    return difference / scale if scale > 0 else difference


def gradient_floor(dout: torch.Tensor) -> float:
    """The least scale a gradient of attention is judged against: ``‖dout‖`` (float64), dout the
    incoming gradient of the rows of the rank (B, S_r, Hq, D).

    A gradient can be exactly zero where its inputs are not: a query that sees a single key has
    a constant softmax, so its dq is 0 and so are its keys' dK terms. Its expected value is then
    the rounding of a zero (~1e-16), and any reordering of the same math (another backend,
    another library) looks 100% wrong against it. Every gradient's rounding scales with the
    signal that flows in, dout, so ``‖dout‖`` floors the scale; a real mistake (a missing block,
    a wrong mask) still shows as an error of the size of the gradient itself."""
    return torch.linalg.vector_norm(dout.detach().double().cpu()).item()


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance for results computed in ``dtype`` (float64 or float32)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"no fixed tolerance for {dtype}; use assert_no_worse_than_baseline")
    return TOLERANCE[dtype]


def oracle_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of results computed in ``dtype`` against the oracle run on the
    same ``dtype`` inputs (real code vs oracle, shard by shard).

    float64 and float32: :func:`tolerance`. float16 and bfloat16: both sides run the same block
    math in float32 on the same 16-bit inputs and round to 16 bits at the same steps, so sums
    reordered by a collective (float32 differences ~1e-7) can only flip a rounding by one unit in
    the last place: ``<= finfo(dtype).eps·|x|`` per entry, so ``‖a − b‖ <= eps·‖b‖`` even if every
    entry flipped (float16 9.8e-4; most shards are bit-identical, the worst observed is 5e-5).
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).eps
    return tolerance(dtype)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    what: str = "",
) -> float:
    """Assert ``relative_error(actual, expected) <= tolerance(dtype)`` and return the error.

    ``dtype`` defaults to ``actual.dtype`` (pass float32 for float32 LSEs of 16-bit runs, etc.).
    """
    error = relative_error(actual, expected)
    limit = tolerance(actual.dtype if dtype is None else dtype)
    if not error <= limit:
        raise AssertionError(f"{what or 'tensor'}: relative error {error:.3e} > {limit:.0e}")
    return error


def baseline_limit(
    baseline: torch.Tensor, truth: torch.Tensor, kind: str = "output", floor: float = 0.0
) -> float:
    """The 16-bit bar: ``BASELINE_FACTOR[kind]`` (2 for outputs, 3 for gradients) times the
    error of ``baseline`` (plain torch attention in the 16-bit dtype) against the float64
    ``truth`` (:func:`relative_error`, scale at least ``floor``). Infinite when the baseline
    overflowed: such a bar bounds nothing (:func:`assert_no_worse_than_baseline` refuses it)."""
    return BASELINE_FACTOR[kind] * relative_error(baseline, truth, floor)


def assert_no_worse_than_baseline(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    truth: torch.Tensor,
    *,
    kind: str = "output",
    what: str = "",
) -> float:
    """16-bit rule: ``err(actual, truth) <= factor · err(baseline, truth)``, factor 2 (3 for grads).

    ``truth`` is the float64 result; ``baseline`` is plain torch attention run in the same 16-bit
    dtype as ``actual``. Returns the error of ``actual``.

    A baseline that overflowed (inf or NaN that ``truth`` does not share: float16 holds at most
    65504, and plain attention forms its scores in the inputs' dtype) has an infinite error,
    which would let any answer pass; that is an AssertionError naming the overflow, not a pass.
    Such a case needs another bar: e.g. the naive computation in float32 on the 16-bit-rounded
    inputs.
    """
    error, limit = relative_error(actual, truth), baseline_limit(baseline, truth, kind)
    overflowed = _overflowed_entries(baseline, truth)
    if overflowed:
        raise AssertionError(
            f"{what or kind}: the naive baseline overflowed ({overflowed} of {baseline.numel()} "
            "entries are inf or NaN that the float64 truth does not share), so its error bounds "
            "nothing; judge this case against a baseline that does not overflow, e.g. the naive "
            "computation in float32 on the 16-bit-rounded inputs"
        )
    if not error <= limit:
        factor = BASELINE_FACTOR[kind]
        raise AssertionError(
            f"{what or kind}: relative error {error:.3e} > {factor}x the naive baseline's "
            f"{limit / factor:.3e}"
        )
    return error


def _overflowed_entries(baseline: torch.Tensor, truth: torch.Tensor) -> int:
    """How many entries of ``baseline`` are inf or NaN that ``truth`` does not share (an LSE of
    -inf on both sides, for a row that sees no key, is no overflow)."""
    baseline, truth = baseline.detach().double().cpu(), truth.detach().double().cpu()
    return int((~torch.isfinite(baseline) & (baseline != truth)).sum())
