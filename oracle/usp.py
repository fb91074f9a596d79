"""USP (unified sequence parallelism), emulated: Ulysses along the rows of a 2-D mesh, ring along
the columns.

The W = U·R ranks form a mesh (USP Alg. 1): ulysses groups are contiguous ranks
``[i·U, ..., i·U + U - 1]`` (one per ring index i), ring groups are strided ranks
``j, j + U, j + 2U, ...`` (one per ulysses index j), so ``rank = ring_index·U + ulysses_index``.

Forward: inside each ulysses group, all-to-alls of q, k, v turn sequence into heads: every rank of
the group now holds its ring rank's S/R tokens (positions: the concatenation of the group's) on
H/U heads. Ring attention over each ring group then runs on those tokens and heads, and one more
all-to-all sends ``out`` back (heads -> sequence). Backward mirrors it: all-to-all of dout, the ring
backward, all-to-alls of dq, dk, dv.

Nothing is written twice: the all-to-all steps are ``oracle/ulysses.py``'s and the ring steps
are ``oracle/ring.py``'s ``_forward``/``_backward``, run on sub-worlds that share the ledger. So
U = 1 is ring attention and U = W is Ulysses, message for message (with U = W the one ring rank
owns the whole sequence under any layout, split contiguously: Ulysses' contiguous layout).
"""

from __future__ import annotations

from functools import partial

import torch

from sptutor.checks import check_ulysses_heads
from sptutor.oracle import ring, ulysses
from sptutor.oracle.world import RankRecord, World, nbytes


def _mesh(world_size, degree):
    """The ulysses groups (contiguous ranks) and ring groups (strided ranks) of a U x R mesh."""
    ring_degree = world_size // degree
    ulysses_groups = [list(range(i * degree, (i + 1) * degree)) for i in range(ring_degree)]
    ring_groups = [list(range(j, world_size, degree)) for j in range(degree)]
    return ulysses_groups, ring_groups


def _in_groups(world, groups, step, *per_rank):
    """Run ``step(group_world, *lists)`` on every group, each seeing only its members' entries.

    per_rank: lists indexed by global rank. ``step`` returns one list, or a tuple of lists, indexed
    like its members; returns the same, indexed by global rank.
    """
    outputs, single = [], False
    for members in groups:
        results = step(world.group(members), *([x[m] for m in members] for x in per_rank))
        single = not isinstance(results, tuple)
        results = (results,) if single else results
        outputs = outputs or [[None] * world.size for _ in results]
        for output, result in zip(outputs, results):
            for member, value in zip(members, result):
                output[member] = value
    return outputs[0] if single else tuple(outputs)


def _ring_positions(positions, ulysses_groups):
    """W x (S/R,): each rank's positions after the all-to-all, its ulysses group's concatenated
    (= the tokens its ring rank owns under the layout)."""
    gathered = [torch.cat([positions[m] for m in members]) for members in ulysses_groups]
    return [gathered[rank // len(ulysses_groups[0])] for rank in range(len(positions))]


def _lse_for_checking(world, degree, lse_heads):
    """W x (B, Hq/U, S/R) -> W x (B, Hq, S/W): each rank's LSE for its own tokens, read from its
    ulysses group's state (no message logged; USP itself never needs it)."""
    ulysses_groups, _ = _mesh(world.size, degree)

    def read_group(_group, group_lse):  # reads the ranks' state directly: no message
        return ulysses._lse_for_checking(group_lse)

    return _in_groups(world, ulysses_groups, read_group, lse_heads)


def _forward(world, degree, q, k, v, positions, causal, scale):
    """q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); positions: W x (S/W,); degree: U.

    Returns out: W x (B, S/W, Hq, D) in q's dtype, and what each rank keeps for backward, in the
    heads layout: q: (B, S/R, Hq/U, D), k, v: (B, S/R, max(Hkv/U, 1), D), out like q,
    lse: (B, Hq/U, S/R), each a list over ranks.
    """
    ulysses_groups, ring_groups = _mesh(world.size, degree)
    # sequence -> heads inside each ulysses group: (B, S/W, H, D) -> (B, S/R, H/U, D)
    q_heads, k_heads, v_heads = _in_groups(world, ulysses_groups, ulysses._qkv_to_heads, q, k, v)
    ring_step = partial(ring._forward, causal=causal, scale=scale)
    out_heads, lse_heads = _in_groups(
        world, ring_groups, ring_step,
        q_heads, k_heads, v_heads, _ring_positions(positions, ulysses_groups),
    )  # fmt: skip
    # heads -> sequence: (B, S/R, Hq/U, D) -> (B, S/W, Hq, D)
    out_step = partial(ulysses._heads_to_seq, phase="forward")
    out = _in_groups(world, ulysses_groups, out_step, out_heads)
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)


def _backward(world, degree, dout, saved, positions, causal, scale, heads_kv):
    """dout: W x (B, S/W, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs.

    Returns dq: W x (B, S/W, Hq, D) and dk, dv: W x (B, S/W, Hkv, D), in dout's dtype.
    """
    ulysses_groups, ring_groups = _mesh(world.size, degree)
    dout_step = partial(ulysses._seq_to_heads, phase="backward")
    dout_heads = _in_groups(world, ulysses_groups, dout_step, dout)  # W x (B, S/R, Hq/U, D)
    ring_step = partial(ring._backward, causal=causal, scale=scale)
    dq_heads, dk_heads, dv_heads = _in_groups(
        world, ring_groups, ring_step,
        dout_heads, *saved, _ring_positions(positions, ulysses_groups),
    )  # fmt: skip
    grads_step = partial(ulysses._grads_to_seq, heads_kv=heads_kv)
    return _in_groups(world, ulysses_groups, grads_step, dq_heads, dk_heads, dv_heads)


def emulate(
    world: World, q, k, v, dout, *, positions, causal: bool, scale: float, ulysses: int
) -> list[RankRecord]:
    """Run USP with Ulysses degree ``ulysses`` = U (ring degree R = W/U) on the emulated ``world``.

    q: W x (B, S/W, Hq, D); k, v: W x (B, S/W, Hkv, D); dout: like q, or None (forward only);
    positions: W x (S/W,), the USP composition of ``sptutor.layout``. Each rank keeps its
    heads-layout q, k, v, out and lse for backward (``saved_bytes``, ``sptutor.cost.usp``).
    """
    degree, heads_kv = ulysses, k[0].shape[2]
    if degree < 1 or world.size % degree:
        raise ValueError(f"usp needs U·R == W, so U must divide W, got W={world.size}, U={degree}")
    check_ulysses_heads(q[0].shape[2], heads_kv, degree)
    out, saved = _forward(world, degree, q, k, v, positions, causal, scale)
    lse = _lse_for_checking(world, degree, saved[-1])
    records = [
        RankRecord(out=o, lse=l, saved_bytes=sum(nbytes(x[rank]) for x in saved))
        for rank, (o, l) in enumerate(zip(out, lse))
    ]
    if dout is not None:
        grads = _backward(world, degree, dout, saved, positions, causal, scale, heads_kv)
        for record, dq, dk, dv in zip(records, *grads):
            record.dq, record.dk, record.dv = dq, dk, dv
    return records
