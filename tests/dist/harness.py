"""The harness every real method passes: one launch of 4 gloo processes runs many cases, and
each rank's shards, ledger and saved-for-backward bytes are compared with ``oracle.simulate``
(through ``sptutor.testing``, the same API others use to check their own code).

World sizes 1..4 come from sub-groups of one 4-process launch, chosen so that group ranks differ
from global ranks (peers must be computed from the group, never assumed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from hypothesis import strategies as st

from sptutor import launch, layout
from sptutor.mesh import make_usp_mesh
from sptutor.testing import Case, compare_with_oracle, run_case

LAUNCH_WORLD = 4
GROUPS = ((0,), (2, 3), (1, 2, 3), (0, 1, 2, 3))  # W = 1, 2, 3, 4


@st.composite
def softmax_cases(draw, method: str) -> Case:
    """A case for a softmax method: W 1..4, any layout, causal or not, GQA/MQA, odd D."""
    members = draw(st.sampled_from(GROUPS))
    lay = draw(st.sampled_from(layout.LAYOUTS))
    unit = 2 * len(members) if lay == "zigzag" else len(members)
    heads_kv = draw(st.integers(1, 2))
    return Case(
        method=method, members=members, layout=lay, causal=draw(st.booleans()),
        batch=draw(st.integers(1, 2)), seq_len=unit * draw(st.integers(1, 3)),
        heads_q=heads_kv * draw(st.sampled_from([1, 2])), heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([3, 8, 24])),
        dtype=draw(st.sampled_from(["float64", "float32"])), seed=draw(st.integers(0, 10**6)),
    )  # fmt: skip


def run_on_rank(rank: int, world: int, cases: list[Case]) -> list[dict | None]:
    """Body of each process: make the sub-groups and USP meshes (collective), run its cases."""
    groups = {members: dist.new_group(list(members)) for members in GROUPS}
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


def assert_real_matches_oracle(cases: list[Case]) -> None:
    """One launch runs every case; each rank's results must match the oracle (DESIGN §7 rule)."""
    results = launch.spawn(run_on_rank, LAUNCH_WORLD, (cases,))
    for index, case in enumerate(cases):
        per_rank = {rank: results[rank][index] for rank in case.members}
        comparisons = compare_with_oracle(case, per_rank)
        problems = [p for c in comparisons for p in c.problems(getattr(torch, case.dtype))]
        assert not problems, f"{case}: {problems}"
