"""Real LASP / LASP-2 cases with any S and packed documents: drawing them, running them on the
ranks of one 4-process launch, and comparing every rank with ``oracle.simulate`` (shards, ledger,
saved-for-backward bytes) and with the closed form of what it sends and keeps.

:class:`LinearCase` is ``sptutor.testing.Case`` (contiguous layout, ``cu_seqlens``) with two
test-only knobs: one document's q, k, v drawn anew (the isolation test) and leaving ``seq_len``
out (the uneven-S error).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from sptutor import comm, cost, launch
from sptutor.chain import Chain
from sptutor.layout import all_positions, document_ids
from sptutor.testing import Case, compare_with_oracle, random_inputs, run_case
from tests.distributed.harness import GROUPS, LAUNCH_WORLD

DTYPES = ("float64", "float32", "float16")  # the harness's, with the same tolerances


@dataclasses.dataclass(frozen=True)
class LinearCase(Case):
    """A lasp or lasp2 :class:`Case`; ``altered``: positions [a, b) whose q, k, v come from seed
    ``seed + 1``; ``give_seq_len``: pass ``seq_len=S`` (False: leave it out)."""

    backend: str = "torch"
    altered: tuple[int, int] | None = None
    give_seq_len: bool = True

    def inputs(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        q, k, v, dout = super().inputs(dtype)
        if self.altered is not None:
            shape = (self.batch, self.seq_len, self.heads_q, self.heads_kv, self.head_dim)
            other = random_inputs(*shape, dtype=q.dtype, seed=self.seed + 1)
            part = slice(*self.altered)
            for mine, theirs in zip((q, k, v), other):
                mine[:, part] = theirs[:, part]
        return q, k, v, dout

    def options(self, group, mesh) -> dict:
        options = super().options(group, mesh)
        return options | ({} if self.give_seq_len else {"seq_len": None})


@st.composite
def document_offsets(draw, seq_len: int, world: int) -> tuple[int, ...]:
    """cu_seqlens over S tokens, of one kind: boundaries anywhere, exactly at the rank edges,
    every token its own document, one document over every rank, or a mix; sometimes with an
    empty document (a repeated offset)."""
    edges = [int(p[0]) for p in all_positions(seq_len, world=world)[1:]]  # first of ranks 1..
    inner = list(range(1, seq_len))
    kind = draw(st.sampled_from(["anywhere", "edges", "singletons", "one", "mixed"]))
    cuts = set()
    if kind in ("anywhere", "mixed") and inner:
        cuts |= set(draw(st.lists(st.sampled_from(inner), max_size=seq_len)))
    if kind in ("edges", "mixed"):
        cuts |= set(edges)
    if kind == "singletons":
        cuts = set(inner)
    offsets = sorted({0, seq_len} | cuts)
    if draw(st.booleans()):  # an empty document: check_cu_seqlens allows a repeated offset
        offsets = sorted([*offsets, draw(st.sampled_from(offsets))])
    return tuple(offsets)


@st.composite
def linear_document_cases(draw, method: str, members: tuple[int, ...]) -> LinearCase:
    """A lasp/lasp2 case on ``members``: any S >= W (C_t may differ by one), causal with packed
    documents and decay or not, or non-causal without documents; GQA/MQA, odd D, 3 dtypes."""
    world = len(members)
    seq_len = draw(st.integers(world, 3 * world + 2))
    causal, heads_kv = draw(st.booleans()), draw(st.integers(1, 2))
    heads_q = heads_kv * draw(st.sampled_from([1, 2]))
    rates = st.floats(0.5, 1.0, exclude_min=True, exclude_max=True)
    decay = draw(st.none() | st.tuples(*[rates] * heads_q)) if causal else None
    cu_seqlens = draw(document_offsets(seq_len, world)) if causal else None
    return LinearCase(
        method=method, members=members, layout="contiguous", causal=causal,
        batch=draw(st.integers(1, 2)),
        seq_len=seq_len, heads_q=heads_q, heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([3, 8])), dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 10**6)), decay=decay, cu_seqlens=cu_seqlens,
    )  # fmt: skip


def linear_case(
    method,
    members,
    causal,
    batch,
    seq_len,
    heads_q,
    heads_kv,
    head_dim,
    dtype="float64",
    seed=0,
    decay=None,
    cu_seqlens=None,
    **knobs,
) -> LinearCase:
    """A contiguous :class:`LinearCase`, its numbers in this order (knobs by keyword)."""
    return LinearCase(
        method,
        members,
        "contiguous",
        causal,
        batch,
        seq_len,
        heads_q,
        heads_kv,
        head_dim,
        dtype,
        seed,
        decay=decay,
        cu_seqlens=cu_seqlens,
        **knobs,
    )


def run_one(case: LinearCase, group) -> dict:
    """On one member rank: ``sptutor.testing.run_case`` (its shards of out, dq, dk, dv, its
    messages and saved bytes), or ``{"error": message}`` for a ValueError."""
    try:
        return run_case(case, group)
    except ValueError as error:
        return {"error": str(error)}


def run_on_rank(rank: int, world: int, cases: list[LinearCase]) -> list[dict | None]:
    """Body of each process: make the sub-groups (collective), run its cases."""
    groups = {members: comm.new_group(members) for members in GROUPS}
    return [run_one(c, groups[c.members]) if rank in c.members else None for c in cases]


def run_cases(cases: list[LinearCase]) -> list[dict[int, dict]]:
    """One launch of every case: each case's ``{global rank: run_one result}``."""
    results = launch.spawn(run_on_rank, LAUNCH_WORLD, (cases,))
    return [{rank: results[rank][n] for rank in case.members} for n, case in enumerate(cases)]


def closed_form(case: LinearCase) -> list[tuple[int, int, int]]:
    """Per rank (forward bytes sent, backward bytes sent, bytes saved), from ``sptutor.cost``:
    one D×D state per message whatever S and the documents; saved its q, k, v shards of C_t
    tokens, plus one state where it reads one (``cost.states_read``; ``Chain.reads`` must say
    the same, asserted here)."""
    shape = cost.Shape(case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim,
                       case.torch_dtype)  # fmt: skip
    closed = cost.of(case.method, shape, case.world, causal=case.causal,
                     cu_seqlens=case.cu_seqlens_tensor())  # fmt: skip
    positions = case.positions()
    documents = [None] * case.world
    if case.cu_seqlens is not None:
        documents = [document_ids(case.cu_seqlens_tensor(), p) for p in positions]
    reads = Chain.of(positions, documents).reads
    if case.causal:
        assert reads == cost.linear.states_read(shape, case.world, True, case.cu_seqlens_tensor())
    return list(zip(closed.forward, closed.backward, closed.saved))


def problems(case: LinearCase, per_rank: dict[int, dict]) -> list[str]:
    """Everything where the real ranks differ from the oracle or the closed form (empty: none).

    Tolerances: the design's (``oracle_tolerance``, through ``compare_with_oracle``): float64
    1e-10, float32 1e-5 relative, float16 one ulp; both sides run the same segment math in the
    same order, only the collectives' summation order differs."""
    found = [p for c in compare_with_oracle(case, per_rank) for p in c.problems(case.torch_dtype)]
    for (rank, real), form in zip(per_rank.items(), closed_form(case)):
        sent = [sum(m[3] for m in real["messages"] if m[4] == p) for p in ("forward", "backward")]
        if (*sent, real["saved"]) != form:
            found.append(f"rank {rank}: sent, saved {(*sent, real['saved'])}, closed {form}")
    return found
