"""The oracle API for other implementations: run a per-rank attention function on every rank and
compare each rank's shards, messages and saved-for-backward bytes with ``oracle.simulate``.

:func:`run_case` runs an attention function (sptutor's, or yours) on one rank of a launch;
:func:`compare_with_oracle` compares every rank's results with the oracle's and returns one
:class:`Comparison` per rank, whose :meth:`~Comparison.report` says in words whether the numbers
match (the verdict) and how messages and memory compare (information). The tolerance rule these
comparisons use lives in ``sptutor.tolerances`` and is re-exported here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import sptutor
from sptutor import blocks, layout, ledger, oracle
from sptutor.tolerances import (
    BASELINE_FACTOR,
    TOLERANCE,
    assert_close,
    assert_no_worse_than_baseline,
    oracle_tolerance,
    relative_error,
    tolerance,
)

__all__ = [
    "BASELINE_FACTOR",
    "TOLERANCE",
    "Case",
    "Comparison",
    "assert_close",
    "assert_no_worse_than_baseline",
    "compare_with_oracle",
    "oracle_tolerance",
    "random_inputs",
    "relative_error",
    "run_case",
    "tolerance",
]


def random_inputs(
    batch: int,
    seq_len: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal full inputs q, k, v, dout: q, dout (B, S, Hq, D) and k, v
    (B, S, Hkv, D), drawn in float64 (in that order) and rounded to ``dtype``, so every dtype
    sees the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    q_shape, kv_shape = (batch, seq_len, heads_q, head_dim), (batch, seq_len, heads_kv, head_dim)
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        for shape in (q_shape, kv_shape, kv_shape, q_shape)
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a real method on the global ranks ``members``, with seeded full inputs.

    ``ulysses`` is USP's Ulysses degree U; ``decay`` the per-head decay of linear methods;
    ``backend`` where the blocks are computed (see Design, *Public API*).
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
        shape = (self.batch, self.seq_len, self.heads_q, self.heads_kv, self.head_dim)
        return random_inputs(*shape, dtype=getattr(torch, self.dtype), seed=self.seed)

    def decay_tensor(self) -> torch.Tensor | None:
        """decay as a (Hq,) tensor of the inputs' dtype, or None."""
        return (
            None
            if self.decay is None
            else torch.tensor(self.decay, dtype=getattr(torch, self.dtype))
        )

    def options(self, group, mesh) -> dict:
        """Keyword arguments of the real method: its signature in Design, *Public API*."""
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
    keywords; see Design, *Public API*) to check it. ``mesh`` is the ``make_usp_mesh`` result for
    usp.
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
    )  # fmt: skip
    names = ("out", "dq", "dk", "dv") if case.is_linear else ("out", "lse", "dq", "dk", "dv")
    comparisons = []
    for local, rank in enumerate(case.members):
        real, expected = per_rank[rank], sim.ranks[local]
        errors = {name: relative_error(real[name], getattr(expected, name)) for name in names}
        oracle_messages = [_to_global(e.key(), case.members) for e in sim.ledger.messages(local)]
        comparisons.append(Comparison(rank, errors, real["messages"], oracle_messages,
                                      real["saved"], expected.saved_bytes))  # fmt: skip
    return comparisons


def _to_global(key: tuple, members: tuple[int, ...]) -> tuple:
    """An oracle event key with group ranks replaced by the global ranks of ``members``."""
    op, rank, peer, nbytes, phase, step = key
    return (op, members[rank], None if peer is None else members[peer], nbytes, phase, step)
