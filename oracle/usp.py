"""USP (unified sequence parallelism), emulated: Ulysses along the rows of a 2-D mesh, ring along
the columns.

The W = U·R ranks form a mesh (USP Alg. 1): ulysses groups are contiguous ranks
``[i·U, ..., i·U + U - 1]`` (one per ring index i), ring groups are strided ranks
``j, j + U, j + 2U, ...`` (one per ulysses index j), so ``rank = ring_index·U + ulysses_index``.

Forward: inside each ulysses group, all-to-alls of q, k, v turn sequence into heads: every rank of
group i now holds its ring rank's T_i tokens (positions and document ids: the concatenation of the
group's) on H/U heads. Ring attention over each ring group then runs on those tokens and heads, and
one more all-to-all sends ``out`` back (heads -> sequence). Backward mirrors it: all-to-all of dout,
the ring backward, all-to-alls of dq, dk, dv.

Uneven shards: each ulysses group's all-to-alls pad its U shards to their largest, ``L_i =
ceil(T_i/U)``, and drop the padding after (``sptutor.padding``, as Ulysses does); the ring then
passes blocks of T_i tokens, which differ by a token when R does not divide S (as ring attention
does). So U = 1 and U = W stay ring and Ulysses, message for message, for any S.

Nothing is written twice: the all-to-all steps are ``oracle/ulysses.py``'s and the ring steps
are ``oracle/ring.py``'s ``_forward``/``_backward``, run on sub-worlds that share the ledger. So
U = 1 is ring attention and U = W is Ulysses, message for message (with U = W the one ring rank
owns the whole sequence under any layout, split contiguously: Ulysses' contiguous layout).

Mirrors ``sptutor/usp.py`` step for step; here index ``r`` of each list is rank r, and
``_in_groups`` runs each step on every group's sub-world where the real code runs it on this
rank's group.
"""

from __future__ import annotations

from typing import NamedTuple

from sptutor import heads
from sptutor.checks import check_ulysses_heads
from sptutor.oracle import ring, ulysses
from sptutor.oracle.world import RankRecord, World, nbytes


class _Mesh(NamedTuple):
    """The emulated twin of ``sptutor.mesh.UspMesh``: every group's members, not one rank's.

    ulysses: the degree U; ulysses_groups: R lists of U contiguous ranks; ring_groups: U lists of
    R strided ranks (indices into the world).
    """

    ulysses: int
    ulysses_groups: list[list[int]]
    ring_groups: list[list[int]]


def _mesh(world_size, degree):
    """The ulysses groups (contiguous ranks) and ring groups (strided ranks) of a U x R mesh."""
    ulysses_groups = [list(range(i, i + degree)) for i in range(0, world_size, degree)]
    ring_groups = [list(range(j, world_size, degree)) for j in range(degree)]
    return _Mesh(degree, ulysses_groups, ring_groups)


def _in_groups(world, groups, step, *per_rank, **options):
    """Run ``step(group_world, *lists, **options)`` on every group's sub-world (the real code runs
    it on this rank's group), each seeing only its members' entries.

    per_rank: lists indexed by global rank. ``step`` returns one list, or a tuple of lists, indexed
    like its members; returns the same, indexed by global rank.
    """
    outputs, single = [], False
    for members in groups:
        results = step(
            world.group(members), *([x[m] for m in members] for x in per_rank), **options
        )
        single = not isinstance(results, tuple)
        results = (results,) if single else results
        outputs = outputs or [[None] * world.size for _ in results]
        for output, result in zip(outputs, results):
            for member, value in zip(members, result):
                output[member] = value
    return outputs[0] if single else tuple(outputs)


def _lse_for_checking(world, mesh, lse_heads, sizes):
    """W x (B, Hq/U, T_i) -> W x (B, Hq, S_r): each rank's LSE for its own tokens, read from its
    ulysses group's state (no message logged; USP itself never needs it). sizes: W x S_r."""

    def read_group(_group, group_lse, group_sizes):  # reads the ranks' state directly: no message
        return ulysses._lse_for_checking(group_lse, group_sizes)

    return _in_groups(world, mesh.ulysses_groups, read_group, lse_heads, sizes)


def _forward(world, q, k, v, positions, documents, causal, scale, mesh):
    """q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); positions: W x (S_r,); documents:
    W x (S_r,) document ids, or W x None.

    Returns out: W x (B, S_r, Hq, D) in q's dtype, and what each rank keeps for backward, in the
    heads layout (rank of ring index i): q: (B, T_i, Hq/U, D), k, v: (B, T_i, max(Hkv/U, 1), D),
    out like q, lse: (B, Hq/U, T_i), each a list over ranks.
    """
    # BEGIN SOLUTION usp forward: to heads in the ulysses group, ring over the ring group, back
    sizes = [len(p) for p in positions]  # each step sees its ulysses group's U of them
    ring_positions = heads.gathered_positions(positions, mesh.ulysses)  # R x (T_i,)
    ring_documents = heads.gathered_documents(documents, mesh.ulysses)  # R x (T_i,) or None
    # sequence -> heads inside each ulysses group: (B, S_r, H, D) -> (B, T_i, H/U, D)
    q_heads, k_heads, v_heads = _in_groups(
        world, mesh.ulysses_groups, ulysses._qkv_to_heads, q, k, v, sizes
    )
    # ring attention over each ring group, on those tokens and heads
    out_heads, lse_heads = _in_groups(
        world, mesh.ring_groups, ring._forward, q_heads, k_heads, v_heads,
        positions=ring_positions, documents=ring_documents, causal=causal, scale=scale,
    )  # fmt: skip
    # heads -> sequence: (B, T_i, Hq/U, D) -> (B, S_r, Hq, D)
    out = _in_groups(
        world, mesh.ulysses_groups, ulysses._heads_to_seq, out_heads, sizes, phase="forward"
    )
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)
    # END SOLUTION


def _backward(world, dout, saved, positions, documents, causal, scale, heads_kv, mesh):
    """dout: W x (B, S_r, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs.

    Returns dq: W x (B, S_r, Hq, D) and dk, dv: W x (B, S_r, Hkv, D), in dout's dtype.
    """
    # BEGIN SOLUTION usp backward: dout to heads, the ring backward, gradients back to sequence
    sizes = [len(p) for p in positions]
    ring_positions = heads.gathered_positions(positions, mesh.ulysses)  # R x (T_i,)
    ring_documents = heads.gathered_documents(documents, mesh.ulysses)  # R x (T_i,) or None
    # sequence -> heads: (B, S_r, Hq, D) -> (B, T_i, Hq/U, D)
    dout_heads = _in_groups(
        world, mesh.ulysses_groups, ulysses._seq_to_heads, dout, sizes, phase="backward"
    )
    # the ring backward over each ring group
    dq_heads, dk_heads, dv_heads = _in_groups(
        world, mesh.ring_groups, ring._backward, dout_heads, *saved,
        positions=ring_positions, documents=ring_documents, causal=causal, scale=scale,
    )  # fmt: skip
    # heads -> sequence, K/V replicas summed: (B, T_i, H/U, D) -> (B, S_r, H, D)
    return _in_groups(
        world, mesh.ulysses_groups, ulysses._grads_to_seq, dq_heads, dk_heads, dv_heads, sizes,
        heads_kv=heads_kv,
    )  # fmt: skip
    # END SOLUTION


def emulate(
    world: World, q, k, v, dout, *, positions, documents, causal: bool, scale: float, ulysses: int
) -> list[RankRecord]:
    """Run USP with Ulysses degree ``ulysses`` = U (ring degree R = W/U) on the emulated ``world``.

    q: W x (B, S_r, Hq, D); k, v: W x (B, S_r, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S_r,), the USP composition of ``sptutor.layout``; documents: W x (S_r,)
    document ids, or W x None. Each rank keeps its heads-layout q, k, v, out and lse for
    backward (``saved_bytes``, ``sptutor.cost.usp``).
    """
    degree, heads_kv = ulysses, k[0].shape[2]
    if degree < 1 or world.size % degree:
        raise ValueError(f"usp needs U·R == W, so U must divide W, got W={world.size}, U={degree}")
    check_ulysses_heads(q[0].shape[2], heads_kv, degree)
    mesh = _mesh(world.size, degree)
    out, saved = _forward(world, q, k, v, positions, documents, causal, scale, mesh)
    lse = _lse_for_checking(world, mesh, saved[-1], [len(p) for p in positions])
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(nbytes(x[rank]) for x in saved))
        for rank, (o, l) in enumerate(zip(out, lse))
    ]
    if dout is not None:
        grads = _backward(world, dout, saved, positions, documents, causal, scale, heads_kv, mesh)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
