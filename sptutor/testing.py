"""The tolerance rule of DESIGN §7 in one place, for sptutor's tests and for yours.

Every comparison in sptutor is *relative to the scale of the expected tensor*
(``‖actual − expected‖ / ‖expected‖``): linear-attention outputs grow with the sequence, softmax
outputs do not, and one rule must serve both.

- float64 vs float64: the same math reordered, so the error is a few ulps times a small growth
  factor; ``1e-10`` leaves four orders of magnitude of headroom over the ~1e-15 we observe and is
  still far below any real bug (a wrong mask or a missing block gives errors of 1e-2 or more).
- float32 vs a float64 oracle: float32 has ~6e-8 unit roundoff; sums over a few thousand terms
  stay below ``1e-5``.
- float16 / bfloat16: no fixed number is honest (it depends on S, D and the data), so the error
  must be at most 2× (3× for gradients) that of plain torch attention computed in the same dtype
  against the same float64 truth: "no worse than the naive baseline".

The second half is the oracle API for other implementations: :func:`run_case` runs an attention
function (sptutor's, or yours) on each rank, and :func:`compare_with_oracle` checks every rank's
shards, messages and saved-for-backward bytes against ``oracle.simulate``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import sptutor
from sptutor import layout, ledger, oracle

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
BASELINE_FACTOR = {"output": 2.0, "gradient": 3.0}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64 (absolute when ``expected`` is all zero).

    Entries where both tensors hold the same infinity (an LSE of -inf for a row that sees no key)
    count as equal; an infinity on one side only makes the error infinite.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_infinity = torch.isinf(expected) & (actual == expected)
    if bool((torch.isinf(actual) | torch.isinf(expected))[~same_infinity].any()):
        return float("inf")
    actual, expected = actual[~same_infinity], expected[~same_infinity]
    scale = torch.linalg.vector_norm(expected).item()
    difference = torch.linalg.vector_norm(actual - expected).item()
    return difference / scale if scale > 0 else difference


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance for results computed in ``dtype`` (float64 or float32)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"no fixed tolerance for {dtype}; use assert_no_worse_than_baseline")
    return TOLERANCE[dtype]


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
    """
    error, baseline_error = relative_error(actual, truth), relative_error(baseline, truth)
    factor = BASELINE_FACTOR[kind]
    if not error <= factor * baseline_error:
        raise AssertionError(
            f"{what or kind}: relative error {error:.3e} > {factor}x the naive baseline's "
            f"{baseline_error:.3e}"
        )
    return error


# ---- Real code vs oracle: run a method on every rank, compare with ``oracle.simulate`` ----


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a real method on the global ranks ``members``, with seeded full inputs.

    ``ulysses`` is USP's Ulysses degree U; ``decay`` the per-head decay of linear methods;
    ``backend`` where the blocks are computed (DESIGN §4).
    """

    method: str
    members: tuple[int, ...]
    layout: str
    causal: bool
    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "float64"
    seed: int = 0
    ulysses: int | None = None
    decay: tuple[float, ...] | None = None
    backend: str = "auto"

    @property
    def is_linear(self) -> bool:
        return self.method in oracle.LINEAR_METHODS

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Full q, dout: (B, S, Hq, D) and k, v: (B, S, Hkv, D); the same on every process."""
        generator = torch.Generator().manual_seed(self.seed)
        q_shape = (self.batch, self.seq_len, self.heads_q, self.head_dim)
        kv_shape = (self.batch, self.seq_len, self.heads_kv, self.head_dim)
        dtype = getattr(torch, self.dtype)
        return tuple(
            torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape in (q_shape, kv_shape, kv_shape, q_shape)
        )

    def decay_tensor(self) -> torch.Tensor | None:
        """decay as a (Hq,) tensor of the inputs' dtype, or None."""
        return (
            None
            if self.decay is None
            else torch.tensor(self.decay, dtype=getattr(torch, self.dtype))
        )

    def options(self, group, mesh) -> dict:
        """Keyword arguments of the real method: DESIGN §4's signature for ``method``."""
        if self.is_linear:
            return dict(causal=self.causal, decay=self.decay_tensor(), group=group,
                        backend=self.backend)  # fmt: skip
        if self.method == "usp":
            return dict(causal=self.causal, layout=self.layout, mesh=mesh, backend=self.backend)
        return dict(causal=self.causal, layout=self.layout, group=group, backend=self.backend)

    def shards(self, local: int) -> tuple[torch.Tensor, ...]:
        """This group rank's q, k, v, dout shards."""
        world, lay, degree = len(self.members), self.layout, self.ulysses or 1
        return tuple(
            layout.shard(x, world=world, layout=lay, ulysses=degree)[local] for x in self.inputs()
        )


def run_case(case: Case, group, attention=None, mesh=None) -> dict:
    """On one member rank: forward and backward of ``attention`` on this rank's shards.

    ``attention`` defaults to sptutor's ``<case.method>_attention``; pass your own (same
    keywords, DESIGN §4) to check it. ``mesh`` is the ``make_usp_mesh`` result for usp.
    Returns this rank's out, lse (None for linear methods), dq, dk, dv, its message events
    (``CommEvent.key()``) and the bytes autograd saved for backward.
    """
    attention = attention or getattr(sptutor, f"{case.method}_attention")
    q, k, v, dout = case.shards(dist.get_rank(group))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    options = case.options(group, mesh)
    saved = []

    def count_saved(x):
        saved.append(x.numel() * x.element_size())
        return x

    with ledger.record() as led:
        with torch.autograd.graph.saved_tensors_hooks(count_saved, lambda x: x):
            out = attention(q, k, v, **options)
        out.backward(dout)
    lse = None
    if not case.is_linear:
        with torch.no_grad():
            _, lse = attention(q, k, v, return_lse=True, **options)
    messages = [event.key() for event in led.messages()]
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, messages=messages,
                saved=sum(saved))  # fmt: skip


@dataclasses.dataclass
class Comparison:
    """How one rank's real results compare with the oracle's."""

    rank: int
    errors: dict[str, float]
    ledger_match: bool
    saved_bytes: int
    oracle_saved_bytes: int

    def problems(self, dtype: torch.dtype) -> list[str]:
        """What breaks DESIGN §7's tolerance, the ledger or the saved bytes (empty if nothing)."""
        found = [
            f"{name} error {e:.2e}" for name, e in self.errors.items() if not e <= tolerance(dtype)
        ]
        if not self.ledger_match:
            found.append("ledger differs from the oracle's")
        if self.saved_bytes != self.oracle_saved_bytes:
            found.append(f"saved {self.saved_bytes} bytes, oracle {self.oracle_saved_bytes}")
        return [f"rank {self.rank}: {problem}" for problem in found]


def compare_with_oracle(case: Case, per_rank: dict[int, dict]) -> list[Comparison]:
    """Compare member ranks' ``run_case`` results with ``oracle.simulate`` on the same inputs."""
    q, k, v, dout = case.inputs()
    sim = oracle.simulate(
        case.method, q, k, v, dout, world=len(case.members), causal=case.causal,
        layout=case.layout, ulysses=case.ulysses, decay=case.decay_tensor(),
    )  # fmt: skip
    names = ("out", "dq", "dk", "dv") if case.is_linear else ("out", "lse", "dq", "dk", "dv")
    comparisons = []
    for local, rank in enumerate(case.members):
        real, expected = per_rank[rank], sim.ranks[local]
        errors = {name: relative_error(real[name], getattr(expected, name)) for name in names}
        oracle_messages = [_to_global(e.key(), case.members) for e in sim.ledger.messages(local)]
        comparisons.append(Comparison(rank, errors, real["messages"] == oracle_messages,
                                      real["saved"], expected.saved_bytes))  # fmt: skip
    return comparisons


def _to_global(key: tuple, members: tuple[int, ...]) -> tuple:
    """An oracle event key with group ranks replaced by the global ranks of ``members``."""
    op, rank, peer, nbytes, phase, step = key
    return (op, members[rank], None if peer is None else members[peer], nbytes, phase, step)
