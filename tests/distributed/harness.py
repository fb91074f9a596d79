"""The harness every real method passes: one launch of 4 gloo processes runs many cases, and
each rank's shards, ledger and saved-for-backward bytes are compared with ``oracle.simulate``
(through ``sptutor.testing``, the same API others use to check their own code).

World sizes 1..4 come from sub-groups of one 4-process launch, chosen so that group ranks differ
from global ranks (peers must be computed from the group, never assumed).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from sptutor import comm, cost, launch, layout
from sptutor.mesh import make_usp_mesh
from sptutor.testing import Case, compare_with_oracle, run_case
from tests.strategies import documents, shard_edges

LAUNCH_WORLD = 4
GROUPS = ((0,), (2, 3), (1, 2, 3), (0, 1, 2, 3))  # W = 1, 2, 3, 4
# float16 too: real code and oracle run the same block math in float32 on the same fp16 inputs,
# so they agree to one unit in the last place of fp16 (sptutor.testing.oracle_tolerance, 9.8e-4;
# most shards are bit-identical, the worst seen 5e-5), and sptutor.cost's 16-bit byte counts
# (float32 accumulators and LSEs) are checked against both
DTYPES = ("float64", "float32", "float16")


def per_group(cases_on, count: int = 4) -> st.SearchStrategy[list[Case]]:
    """Lists of ``count`` cases on every group of GROUPS, ``cases_on(members)`` drawing each, so
    that even Hypothesis' first (simplest) list covers every world size W = 1..4."""
    return st.tuples(*[cases_on(members) for members in GROUPS for _ in range(count)]).map(list)


def _sizes(draw, members: tuple[int, ...], lay: str, degree: int = 1):
    """(S, cu_seqlens): any S the layout can cut (S >= W, zigzag S >= 2W), so shards mostly
    differ by a token, and packed documents (boundaries anywhere, some on the ranks' edges,
    one-token and empty documents, [0, S]) or None."""
    least = 2 * len(members) if lay == "zigzag" else len(members)
    seq_len = draw(st.integers(least, 3 * least))
    cu_seqlens = draw(documents(seq_len, shard_edges(seq_len, len(members), lay, degree)))
    return seq_len, None if cu_seqlens is None else tuple(cu_seqlens.tolist())


@st.composite
def softmax_cases(draw, method: str, members: tuple[int, ...]) -> Case:
    """A case for a softmax method on ``members``: any layout, any S (uneven shards), packed
    documents or none, causal or not, GQA/MQA, odd D."""
    lay = draw(st.sampled_from(layout.LAYOUTS))
    seq_len, cu_seqlens = _sizes(draw, members, lay)
    heads_kv = draw(st.integers(1, 2))
    return Case(
        method=method, members=members, layout=lay, causal=draw(st.booleans()),
        batch=draw(st.integers(1, 2)), seq_len=seq_len,
        heads_q=heads_kv * draw(st.sampled_from([1, 2])), heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([3, 8, 24])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 10**6)),
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


def run_on_rank(rank: int, world: int, cases: list[Case]) -> list[dict | None]:
    """Body of each process: make the sub-groups and USP meshes (collective), run its cases."""
    groups = {members: comm.new_group(members) for members in GROUPS}
    usp_layouts = sorted({(c.members, c.ulysses) for c in cases if c.method == "usp"})
    meshes = {
        (members, degree): make_usp_mesh(degree, len(members) // degree, groups[members])
        for members, degree in usp_layouts
    }
    return [
        run_case(c, groups[c.members], mesh=meshes.get((c.members, c.ulysses)))
        if rank in c.members
        else None
        for c in cases
    ]


@st.composite
def linear_cases(draw, method: str, members: tuple[int, ...]) -> Case:
    """A case for a linear method on ``members``: contiguous layout (the only one), causal or
    not, a per-head decay in (0.5, 1) or None (causal only), GQA/MQA, odd D."""
    causal, heads_kv = draw(st.booleans()), draw(st.integers(1, 2))
    heads_q = heads_kv * draw(st.sampled_from([1, 2, 3]))
    rates = st.floats(0.5, 1.0, exclude_min=True, exclude_max=True)
    decay = draw(st.none() | st.tuples(*[rates] * heads_q)) if causal else None
    return Case(
        method=method, members=members, layout="contiguous", causal=causal,
        batch=draw(st.integers(1, 2)), seq_len=len(members) * draw(st.integers(1, 3)),
        heads_q=heads_q, heads_kv=heads_kv, head_dim=draw(st.sampled_from([3, 8, 24])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 10**6)),
        decay=decay,
    )  # fmt: skip


def ulysses_case_lists(method: str, per_mesh: int) -> st.SearchStrategy[list[Case]]:
    """Lists of ``per_mesh`` cases on every mesh of ``GROUPS`` (U = W for ulysses, every U·R = W
    for usp), so that even Hypothesis' first, simplest list covers every W and U."""
    meshes = [
        (members, degree)
        for members in GROUPS
        for degree in range(1, len(members) + 1)
        if len(members) % degree == 0 and (method == "usp" or degree == len(members))
    ]
    cases = [ulysses_cases(method, *mesh) for mesh in meshes for _ in range(per_mesh)]
    return st.tuples(*cases).map(list)


@st.composite
def ulysses_cases(draw, method: str, members: tuple[int, ...], degree: int) -> Case:
    """A ulysses (U = W) or usp case on ``members`` with Ulysses degree U = ``degree``: any
    layout, any S (uneven shards, padded on the all-to-alls), packed documents or none, causal
    or not, heads fitting the Ulysses rule for U (K/V heads split, or replicated when Hkv < U:
    GQA/MQA), odd D, float64, float32 or float16."""
    lay = draw(st.sampled_from(layout.LAYOUTS))
    split = degree if method == "usp" else 1  # the layout's ulysses=, ring degree W // split
    seq_len, cu_seqlens = _sizes(draw, members, lay, split)
    heads_kv = draw(st.sampled_from([h for h in range(1, 2 * degree + 1) if h % degree == 0
                                     or degree % h == 0]))  # fmt: skip
    return Case(
        method=method, members=members, layout=lay, causal=draw(st.booleans()),
        batch=draw(st.integers(1, 2)), seq_len=seq_len,
        heads_q=max(degree, heads_kv) * draw(st.sampled_from([1, 2])),  # lcm: one divides the other
        heads_kv=heads_kv, head_dim=draw(st.sampled_from([3, 8, 24])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 10**6)),
        ulysses=degree if method == "usp" else None, cu_seqlens=cu_seqlens,
    )  # fmt: skip


def assert_real_matches_oracle(cases: list[Case]) -> list[dict[int, dict]]:
    """One launch runs every case; each rank's shards, ledger and saved bytes must match the
    oracle (the design's tolerances), and its bytes sent per phase and saved for backward must equal
    ``sptutor.cost`` (real == oracle == closed form). Returns each case's ``{rank: result}``."""
    return check_results(cases, launch.spawn(run_on_rank, LAUNCH_WORLD, (cases,)))


def check_results(cases: list[Case], results: list[list[dict | None]]) -> list[dict[int, dict]]:
    """:func:`assert_real_matches_oracle` on results already run (``results[rank][index]``, as
    :func:`run_on_rank` returns them on every rank), for a launch that does more than run cases."""
    per_case = []
    for index, case in enumerate(cases):
        per_rank = {rank: results[rank][index] for rank in case.members}
        comparisons = compare_with_oracle(case, per_rank)
        problems = [p for c in comparisons for p in c.problems(getattr(torch, case.dtype))]
        problems += _cost_problems(case, per_rank)
        assert not problems, f"{case}: {problems}"
        per_case.append(per_rank)
    return per_case


def _cost_problems(case: Case, per_rank: dict[int, dict]) -> list[str]:
    """Where a rank's (forward bytes, backward bytes, saved bytes) differ from ``cost.of``."""
    shape = cost.Shape(case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim,
                       getattr(torch, case.dtype))  # fmt: skip
    expected = cost.of(case.method, shape, len(case.members), causal=case.causal,
                       ulysses=case.ulysses, layout=case.layout)  # fmt: skip
    problems = []
    for local, rank in enumerate(case.members):
        messages, saved = per_rank[rank]["messages"], per_rank[rank]["saved"]
        sent = [sum(m[3] for m in messages if m[4] == phase) for phase in ("forward", "backward")]
        measured = (*sent, saved)
        closed_form = (expected.forward[local], expected.backward[local], expected.saved[local])
        if measured != closed_form:
            problems.append(f"rank {rank}: sent, saved {measured}, cost {closed_form}")
    return problems


def memory_grid(method: str) -> list[Case]:
    """Cases for a saved-bytes formula: S in {16, 32} on W in {2, 4} (sub-group (2, 3) and the
    whole launch), float32 and float64, non-causal, contiguous, Hq=2 over Hkv=1."""
    return [
        Case(method=method, members=members, layout="contiguous", causal=False, batch=1,
             seq_len=seq_len, heads_q=2, heads_kv=1, head_dim=4, dtype=dtype)
        for seq_len in (16, 32) for members in ((2, 3), (0, 1, 2, 3))
        for dtype in ("float32", "float64")
    ]  # fmt: skip
