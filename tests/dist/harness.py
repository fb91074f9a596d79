"""The harness every real method passes: one launch of 4 gloo processes runs many cases, and
each rank's shards, ledger and saved-for-backward bytes are compared with ``oracle.simulate``.

World sizes 1..4 come from sub-groups of one 4-process launch, chosen so that group ranks differ
from global ranks (peers must be computed from the group, never assumed).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from hypothesis import strategies as st

import sptutor
from sptutor import layout, ledger, oracle
from sptutor.testing import assert_close

LAUNCH_WORLD = 4
GROUPS = ([0], [2, 3], [1, 2, 3], [0, 1, 2, 3])  # W = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a real method: what to run, on which sub-group, with which inputs."""

    method: str
    group: int  # index into GROUPS
    layout: str
    causal: bool
    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str  # "float64" or "float32"
    seed: int

    @property
    def members(self) -> list[int]:
        return GROUPS[self.group]

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Full q, k, v, dout (same on every process: seeded)."""
        generator = torch.Generator().manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        q_shape = (self.batch, self.seq_len, self.heads_q, self.head_dim)
        kv_shape = (self.batch, self.seq_len, self.heads_kv, self.head_dim)
        shapes = (q_shape, kv_shape, kv_shape, q_shape)
        return tuple(
            torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes
        )


@st.composite
def softmax_cases(draw, method: str) -> Case:
    """A case for a softmax method: W 1..4, any layout, causal or not, GQA/MQA, odd D."""
    group = draw(st.integers(0, len(GROUPS) - 1))
    world = len(GROUPS[group])
    lay = draw(st.sampled_from(layout.LAYOUTS))
    unit = 2 * world if lay == "zigzag" else world
    heads_kv = draw(st.integers(1, 2))
    return Case(
        method=method, group=group, layout=lay, causal=draw(st.booleans()),
        batch=draw(st.integers(1, 2)), seq_len=unit * draw(st.integers(1, 3)),
        heads_q=heads_kv * draw(st.sampled_from([1, 2])), heads_kv=heads_kv,
        head_dim=draw(st.sampled_from([3, 8, 24])),
        dtype=draw(st.sampled_from(["float64", "float32"])), seed=draw(st.integers(0, 10**6)),
    )  # fmt: skip


def _call(case: Case, q, k, v, group, return_lse=False):
    fn = getattr(sptutor, f"{case.method}_attention")
    return fn(q, k, v, causal=case.causal, layout=case.layout, group=group, return_lse=return_lse)


def _run_case(case: Case, group) -> dict:
    """On one member rank: forward + backward with ledger and saved-tensor hooks."""
    local = dist.get_rank(group)
    world = len(case.members)
    q, k, v, dout = (layout.shard(x, world=world, layout=case.layout)[local] for x in case.inputs())
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with ledger.record() as led:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = _call(case, q, k, v, group)
        out.backward(dout)
    with torch.no_grad():
        _, lse = _call(case, q, k, v, group, return_lse=True)
    return dict(
        out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, saved=sum(saved),
        messages=[e.key() for e in led.messages()],
    )  # fmt: skip


def run_on_rank(rank: int, world: int, cases: list[Case]) -> list[dict | None]:
    """Body of each process: make the sub-groups (collective), run the cases it belongs to."""
    groups = [dist.new_group(members) for members in GROUPS]
    return [_run_case(case, groups[case.group]) if rank in case.members else None for case in cases]


def check_case(case: Case, per_rank: list[dict | None]) -> None:
    """Compare every member rank's results with the oracle: shards, ledger, saved bytes."""
    q, k, v, dout = case.inputs()
    sim = oracle.simulate(case.method, q, k, v, dout, world=len(case.members), causal=case.causal,
                          layout=case.layout)  # fmt: skip
    for local, global_rank in enumerate(case.members):
        real, expected = per_rank[global_rank], sim.ranks[local]
        for name in ("out", "lse", "dq", "dk", "dv"):
            # same block math, same order: float64 to 1e-10, float32 to 1e-5 (DESIGN §7)
            assert_close(real[name], getattr(expected, name), dtype=getattr(torch, case.dtype),
                         what=f"{case} rank {global_rank} {name}")  # fmt: skip
        oracle_messages = [_to_global(e.key(), case.members) for e in sim.ledger.messages(local)]
        assert real["messages"] == oracle_messages, f"{case} rank {global_rank}: ledger differs"
        assert real["saved"] == expected.saved_bytes, f"{case} rank {global_rank}: saved bytes"


def _to_global(key: tuple, members: list[int]) -> tuple:
    """An oracle event key with its group ranks replaced by the global ranks of ``members``."""
    op, rank, peer, nbytes, phase, step = key
    return (op, members[rank], None if peer is None else members[peer], nbytes, phase, step)


def assert_real_matches_oracle(cases: list[Case]) -> None:
    """One launch of 4 processes runs every case; each is then checked against the oracle."""
    results = sptutor.launch.spawn(run_on_rank, LAUNCH_WORLD, (cases,))
    for index, case in enumerate(cases):
        check_case(case, [results[rank][index] for rank in range(LAUNCH_WORLD)])
