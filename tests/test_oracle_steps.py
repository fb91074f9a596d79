"""The oracle's per-step records and its custom positions (what the checker's diagnosis and
libraries that shard their own way need)."""

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import blocks, layout, oracle
from sptutor.testing import random_inputs, tolerance


@st.composite
def custom_partitions(draw, max_world: int = 4):
    """(W, S, positions): a random permutation of 0..S-1 cut into W equal shards."""
    world = draw(st.integers(1, max_world))
    seq_len = world * draw(st.integers(1, 3))
    order = draw(st.permutations(range(seq_len)))
    per = seq_len // world
    return world, seq_len, [torch.tensor(order[r * per : (r + 1) * per]) for r in range(world)]


@st.composite
def uneven_partitions(draw, max_world: int = 4):
    """(W, S, positions, cu_seqlens): a random permutation of 0..S-1 cut into at most W shards
    of any lengths >= 1, and packed documents with boundaries anywhere."""
    world = draw(st.integers(1, max_world))
    seq_len = draw(st.integers(world, 3 * world + 2))
    order = draw(st.permutations(range(seq_len)))
    cuts = (
        sorted(draw(st.sets(st.integers(1, seq_len - 1), max_size=world - 1))) if world > 1 else []
    )
    bounds = [0, *cuts, seq_len]
    owned = [torch.tensor(order[a:b]) for a, b in pairwise(bounds)]
    documents = (
        sorted(draw(st.sets(st.integers(1, seq_len - 1), max_size=3))) if seq_len > 1 else []
    )
    return len(owned), seq_len, owned, torch.tensor([0, *documents, seq_len])


@given(uneven_partitions(), st.sampled_from(["ring", "rsa", "lss", "ulysses", "usp"]),
       st.booleans())  # fmt: skip
def test_any_partition_of_any_lengths_with_documents_gives_full_attention(partition, method,
                                                                          causal):  # fmt: skip
    """Shards of different lengths, positions in any order, packed documents: still exact."""
    world, seq_len, owned, cu_seqlens = partition
    heads = 2 * world  # Ulysses splits heads over W
    q, k, v, dout = random_inputs(1, seq_len, heads, heads, 4, seed=seq_len)
    degree = 1 if method == "usp" else None
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal, positions=owned,
                          ulysses=degree, cu_seqlens=cu_seqlens)  # fmt: skip
    out, lse = oracle.full_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    # float64 vs float64, the same math reordered: the oracle tolerance
    assert torch.allclose(sim.out, out, rtol=0, atol=tolerance(torch.float64) * out.abs().max())
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(sim.lse), finite)
    assert torch.allclose(sim.lse[finite], lse[finite], rtol=0,
                          atol=tolerance(torch.float64) * lse[finite].abs().max())  # fmt: skip
    for rank, pos in enumerate(owned):
        assert torch.equal(sim.ranks[rank].out, sim.out[:, pos])


@given(custom_partitions(), st.sampled_from(["ring", "rsa", "lss", "ulysses", "usp"]),
       st.booleans())  # fmt: skip
def test_any_partition_of_the_positions_gives_full_attention(partition, method, causal):
    world, seq_len, owned = partition
    heads = 2 * world  # Ulysses splits heads over W
    q, k, v, dout = random_inputs(1, seq_len, heads, heads, 4, seed=seq_len)
    degree = 1 if method == "usp" else None
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal, positions=owned,
                          ulysses=degree)  # fmt: skip
    out, lse = oracle.full_attention(q, k, v, causal=causal)
    # float64 vs float64, the same math reordered: the oracle tolerance
    assert sim.layout == "custom"
    assert torch.allclose(sim.out, out, rtol=0, atol=tolerance(torch.float64) * out.abs().max())
    assert torch.allclose(sim.lse, lse, rtol=0, atol=tolerance(torch.float64) * lse.abs().max())
    for rank, pos in enumerate(owned):
        assert torch.equal(sim.ranks[rank].out, sim.out[:, pos])


@pytest.mark.parametrize("method", ["ring", "lss"])
@pytest.mark.parametrize("causal", [False, True])
def test_recorded_blocks_merge_into_each_ranks_output(method, causal):
    world, seq_len = 4, 16
    q, k, v, dout = random_inputs(2, seq_len, 4, 2, 8, seed=3)
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal, layout="zigzag",
                          record_steps=True)  # fmt: skip
    forward = [s for s in sim.steps if s.phase == "forward"]
    backward = [s for s in sim.steps if s.phase == "backward"]
    # every visible (rank, block) pair, once per phase; zigzag + causal skips none at W=4
    assert len(forward) == len(backward) == world * world
    for rank in range(world):
        out = torch.zeros_like(sim.ranks[rank].out)
        lse = torch.full_like(sim.ranks[rank].lse, float("-inf"))
        for step in (s for s in forward if s.rank == rank):
            out, lse = blocks.merge(out, lse, step.tensors["out"], step.tensors["lse"])
        assert torch.equal(out, sim.ranks[rank].out)  # the same merges in the same order
        # summed here in another order than the oracle's accumulators: float64 rounding, ~1e-16
        dq = sum(s.tensors["dq"] for s in backward if s.rank == rank)
        dk = sum(s.tensors["dk"] for s in backward if s.block == rank)
        assert torch.allclose(dq, sim.ranks[rank].dq, rtol=0, atol=1e-12)
        assert torch.allclose(dk, sim.ranks[rank].dk, rtol=0, atol=1e-12)


def test_steps_are_not_kept_unless_asked():
    q, k, v, dout = random_inputs(1, 8, 2, 2, 4)
    assert oracle.simulate("ring", q, k, v, dout, world=2).steps == []


@pytest.mark.parametrize(
    ("owned", "message"),
    [
        ([torch.tensor([0, 1]), torch.tensor([1, 2])], "exactly once"),
        ([torch.tensor([0, 1, 2, 3]), torch.tensor([], dtype=torch.long)], "at least one"),
        ([torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])], "integer"),
        ([torch.tensor([0, 1]), torch.tensor([2, 9])], "exactly once"),
        ([torch.tensor([0, 1]), torch.tensor([2, -3])], ">= 0"),
    ],
)
def test_a_bad_partition_is_refused_with_its_reason(owned, message):
    with pytest.raises(ValueError, match=message):
        layout.check_partition(owned, 4)


def test_linear_methods_take_no_positions():
    q, k, v, dout = random_inputs(1, 4, 2, 2, 4)
    owned = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    with pytest.raises(ValueError, match="no positions"):
        oracle.simulate("lasp", q, k, v, dout, world=2, causal=True, positions=owned)


def test_shard_by_and_unshard_by_are_inverse():
    x = torch.arange(24.0).reshape(1, 6, 2, 2)
    owned = [torch.tensor([5, 0, 3]), torch.tensor([1, 4, 2])]
    parts = layout.shard_by(x, owned)
    assert torch.equal(parts[0][0, :, 0, 0], x[0, [5, 0, 3], 0, 0])
    assert torch.equal(layout.unshard_by(parts, owned), x)
