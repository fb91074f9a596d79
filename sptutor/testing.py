"""The oracle API: check an attention function, yours or sptutor's, against the oracle.

:func:`check` (from ``sptutor.checker``) is the one call for your own code: a sweep of cases in
one launch, a verdict per case, and a diagnosis in words of the smallest failing case.

:func:`run_case` and :func:`compare_with_oracle` are the exact, lower-level pair sptutor's own
tests use: run a case on one rank of a launch, then compare every rank's shards, its messages
and its saved-for-backward bytes with the oracle's (sptutor's methods must match all three
exactly). The tolerance rule lives in ``sptutor.tolerances`` and is re-exported here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import sptutor
from sptutor import blocks, layout, ledger, oracle
from sptutor.checker import Adapter, Case, Report, Sweep, check, check_sptutor, random_inputs
from sptutor.tolerances import (
    BASELINE_FACTOR,
    TOLERANCE,
    assert_close,
    assert_no_worse_than_baseline,
    baseline_limit,
    gradient_floor,
    oracle_tolerance,
    relative_error,
    tolerance,
)

__all__ = [
    "BASELINE_FACTOR",
    "TOLERANCE",
    "Adapter",
    "Case",
    "Comparison",
    "Report",
    "Sweep",
    "assert_close",
    "assert_no_worse_than_baseline",
    "baseline_limit",
    "check",
    "check_sptutor",
    "compare_with_oracle",
    "gradient_floor",
    "oracle_tolerance",
    "random_inputs",
    "relative_error",
    "run_case",
    "tolerance",
]


def run_case(case: Case, group, attention=None, mesh=None, device=None) -> dict:
    """On one member rank: forward and backward of ``attention`` on this rank's shards.

    ``attention`` defaults to sptutor's ``<case.method>_attention``; another function must take
    the same keywords (see Design, *Public API*; :func:`check` takes any signature). ``mesh`` is
    the ``make_usp_mesh`` result for usp. ``device``: where the shards (and a decay) go, e.g.
    ``cuda:LOCAL_RANK`` under NCCL (default: the CPU, where the case makes them).
    Returns this rank's out, lse (None for linear methods), dq, dk, dv (on the CPU), its message
    events (``CommEvent.key()``) and the bytes autograd saved for backward.
    """
    attention = attention or getattr(sptutor, f"{case.method}_attention")
    q, k, v, dout = (x.to(device) for x in case.shards(dist.get_rank(group)))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    options = case.options(group, mesh)
    if options.get("decay") is not None:  # the case makes it on the CPU: it goes with q
        options["decay"] = options["decay"].to(device)
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
    results = dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad)
    cpu = {name: None if x is None else x.cpu() for name, x in results.items()}
    return dict(cpu, messages=messages, saved=sum(saved))


@dataclasses.dataclass
class Comparison:
    """How one rank's real results compare with the oracle's.

    ``errors``: relative error of each of out, lse, dq, dk, dv; ``messages`` and
    ``oracle_messages``: the message events (``CommEvent.key()``) each side logged;
    ``saved_bytes`` and ``oracle_saved_bytes``: what each kept for backward.
    """

    rank: int
    errors: dict[str, float]
    messages: list[tuple]
    oracle_messages: list[tuple]
    saved_bytes: int
    oracle_saved_bytes: int

    @property
    def ledger_match(self) -> bool:
        """Did this rank log exactly the oracle's messages, in order?"""
        return self.messages == self.oracle_messages

    def numerical_problems(self, dtype: torch.dtype) -> list[str]:
        """The tensors whose error breaks the tolerance for ``dtype`` (the inputs' dtype; the
        LSE is judged in its own accumulation dtype: float32 for 16-bit inputs)."""
        lse_dtype = blocks.accumulation_dtype(dtype)
        return [
            f"{name} error {e:.2e} > {oracle_tolerance(lse_dtype if name == 'lse' else dtype):.0e}"
            for name, e in self.errors.items()
            if not e <= oracle_tolerance(lse_dtype if name == "lse" else dtype)
        ]

    def ledger_difference(self) -> str | None:
        """Where this rank's messages first differ from the oracle's, in words (None if equal)."""
        if self.ledger_match:
            return None
        if not self.messages:
            return (f"no message was logged, the oracle sends {len(self.oracle_messages)} "
                    "(messages are seen only when sent through sptutor.comm or logged with "
                    "sptutor.ledger.log)")  # fmt: skip
        for index, (yours, expected) in enumerate(zip(self.messages, self.oracle_messages)):
            if yours != expected:
                return f"message {index} is {yours}, the oracle's is {expected}"
        return f"{len(self.messages)} messages logged, the oracle's {len(self.oracle_messages)}"

    def problems(self, dtype: torch.dtype) -> list[str]:
        """Everything that differs from the oracle: numerics, the ledger and the saved bytes
        (empty if nothing). sptutor's own methods must match all three exactly; for code
        written elsewhere only :meth:`numerical_problems` says right or wrong."""
        found = self.numerical_problems(dtype)
        if not self.ledger_match:
            found.append(f"ledger differs: {self.ledger_difference()}")
        if self.saved_bytes != self.oracle_saved_bytes:
            found.append(f"saved {self.saved_bytes} bytes, oracle {self.oracle_saved_bytes}")
        return [f"rank {self.rank}: {problem}" for problem in found]

    def report(self, dtype: torch.dtype) -> str:
        """One paragraph for a person: numerics first (pass or fail), then messages and memory
        labelled as information (a correct implementation may send and keep other things)."""
        failing = self.numerical_problems(dtype)
        worst = max(self.errors, key=self.errors.get)
        verdict = f"matches the oracle (largest error {self.errors[worst]:.1e}, in {worst})"
        if failing:
            verdict = f"FAILS the oracle: {'; '.join(failing)}"
        messages = self.ledger_difference() or "the same as the oracle's"
        saved = f"{self.saved_bytes} bytes, the oracle {self.oracle_saved_bytes}"
        return (f"rank {self.rank}: {verdict}\n  information: messages: {messages}; "
                f"saved for backward: {saved}")  # fmt: skip


def compare_with_oracle(case: Case, per_rank: dict[int, dict]) -> list[Comparison]:
    """Compare member ranks' ``run_case`` results with ``oracle.simulate`` on the same inputs."""
    q, k, v, dout = case.inputs()
    sim = oracle.simulate(
        case.method, q, k, v, dout, world=len(case.members), causal=case.causal,
        layout=case.layout, ulysses=case.ulysses, decay=case.decay_tensor(),
        cu_seqlens=case.cu_seqlens_tensor(),
    )  # fmt: skip
    names = ("out", "dq", "dk", "dv") if case.is_linear else ("out", "lse", "dq", "dk", "dv")
    dout_shards = layout.shard_by(dout, case.positions())  # the rows whose gradients flow in
    comparisons = []
    for local, rank in enumerate(case.members):
        real, expected = per_rank[rank], sim.ranks[local]
        floor = {name: gradient_floor(dout_shards[local]) for name in ("dq", "dk", "dv")}
        errors = {name: relative_error(real[name], getattr(expected, name), floor.get(name, 0.0))
                  for name in names if real.get(name) is not None}  # fmt: skip
        oracle_messages = [_to_global(e.key(), case.members) for e in sim.ledger.messages(local)]
        comparisons.append(Comparison(rank, errors, real["messages"], oracle_messages,
                                      real["saved"], expected.saved_bytes))  # fmt: skip
    return comparisons


def _to_global(key: tuple, members: tuple[int, ...]) -> tuple:
    """An oracle event key with group ranks replaced by the global ranks of ``members``."""
    op, rank, peer, nbytes, phase, step = key
    return (op, members[rank], None if peer is None else members[peer], nbytes, phase, step)
