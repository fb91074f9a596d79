"""Closed forms of the softmax methods: ring, RSA, LSS, Ulysses and USP, per rank."""

from __future__ import annotations

from sptutor.cost.shapes import Cost, Shape, same_for_every_rank, shard_sizes
from sptutor.ledger import wire_bytes


def _ring_of_blocks(shape: Shape, sizes: list[int]) -> Cost:
    """Ring attention over W = ``len(sizes)`` ranks whose blocks hold ``sizes`` tokens, per rank.

    At step s rank r holds block (r - s) mod W and forwards it (steps 0..W-2): every block but
    the next rank's, ``S - S_{r+1}`` tokens of K and of V, forward and again backward. The dK, dV
    accumulators travel with their blocks W hops: every block's, S tokens of each.
    """
    world, seq_len = len(sizes), sum(sizes)
    kv, kv_acc = (
        shape.tokens_bytes(1, shape.heads_kv, size) for size in (None, shape.acc_itemsize)
    )
    forward = tuple(2 * (seq_len - sizes[(r + 1) % world]) * kv for r in range(world))
    accumulators = 2 * seq_len * kv_acc if world > 1 else 0
    per_token = 2 * shape.tokens_bytes(1, shape.heads_q) + 2 * kv  # q, out, k, v
    lse = shape.batch * shape.heads_q * shape.acc_itemsize  # per token
    saved = tuple(n * (per_token + lse) for n in sizes)
    return Cost(forward, tuple(sent + accumulators for sent in forward), saved)


def ring(shape: Shape, world: int, *, layout: str = "contiguous") -> Cost:
    """Ring attention over W ranks, per rank.

    Forward: K and V blocks make W-1 hops: ``2(W-1)·B·(S/W)·Hkv·D`` elements; when W does not
    divide S, every block but the next rank's: ``2·(S - S_{r+1})·B·Hkv·D``.
    Backward: K and V again (W-1 hops), plus the dK, dV accumulators (W hops, every block once,
    float32 for 16-bit inputs): ``2(W-1)·kv + 2W·kv_acc``; nothing for W = 1.
    Saved: this rank's q, k, v, out and its LSE (B, Hq, S_r) in the accumulation dtype: O(S/W).
    """
    return _ring_of_blocks(shape, shard_sizes(shape.seq_len, world, layout))


def rsa(shape: Shape, world: int, *, layout: str = "contiguous") -> Cost:
    """Ring Self-Attention (Li et al. 2021) over W ranks, per rank.

    Forward: a ring of K, then a ring of V, W-1 hops each: ``2(W-1)·B·(S/W)·Hkv·D`` elements
    (W not dividing S: ``2·(S - S_{r+1})·B·Hkv·D``, every block but the next rank's, as a ring).
    Backward: V and K again (W-1 hops each), and two all-reduces (dV, dK) of a full-length
    (B, S, Hkv, D) gradient in the accumulation dtype, ``2(W-1)/W·B·S·Hkv·D`` elements each:
    ``2(W-1)·kv + 4(W-1)·kv_acc``.
    The paper (§3.2) counts ``2(N−1)·B·Z·(L/N)·A`` forward and ``6(N−1)·B·Z·(L/N)·A`` backward,
    ``8(N−1)·B·Z·(L/N)·A`` in all. Ours is exactly that for float32/float64 multi-head attention
    and differs in two ways: for 16-bit inputs the all-reduced gradients are float32, so they
    cost twice the paper's bytes; and K, V and their gradients have Hkv heads, fewer than the
    paper's Z = Hq under GQA/MQA.
    Saved: this rank's q, k, v and its probabilities P (B, Hq, S_r, S) in the inputs' dtype:
    O(S²/W), the ``B·Z·L²/N`` term of the paper's memory model.
    """
    sizes, seq_len = shard_sizes(shape.seq_len, world, layout), shape.seq_len
    kv = shape.tokens_bytes(1, shape.heads_kv)
    forward = tuple(2 * (seq_len - sizes[(r + 1) % world]) * kv for r in range(world))
    full_gradient = shape.tokens_bytes(seq_len, shape.heads_kv, shape.acc_itemsize)
    all_reduces = 2 * wire_bytes("all_reduce", full_gradient, world)
    per_token = shape.tokens_bytes(1, shape.heads_q) + 2 * kv  # q, k, v
    probs_row = shape.batch * shape.heads_q * seq_len * shape.itemsize  # one query's row of P
    saved = tuple(n * (per_token + probs_row) for n in sizes)
    return Cost(forward, tuple(sent + all_reduces for sent in forward), saved)


def lss(shape: Shape, world: int, *, layout: str = "contiguous") -> Cost:
    """LSS Transformer (our reading of its abstract; see Design, *Methods*) over W ranks, per rank.

    Forward: one all-gather of the fused [K‖V] shard: ``2(W-1)·B·(S/W)·Hkv·D`` elements, the
    bytes of ring's forward in one collective instead of 2(W-1) sends.
    Backward: one reduce-scatter of the fused [dK‖dV] in the accumulation dtype:
    ``2(W-1)·kv_acc``. When W does not divide S both move shards padded to ``L = ceil(S/W)``:
    read L for S/W.
    Saved: this rank's q, out and LSE (B, Hq, S_r) in the accumulation dtype, O(S/W), plus the
    gathered K and V of the whole sequence, as gathered (padded), ``2·B·W·L·Hkv·D`` elements in
    the inputs' dtype (``2·B·S·Hkv·D`` when W divides S): O(S) whatever W.
    """
    longest = -(-shape.seq_len // world)  # L = ceil(S/W), the largest shard
    kv = shape.tokens_bytes(longest, shape.heads_kv)
    kv_acc = shape.tokens_bytes(longest, shape.heads_kv, shape.acc_itemsize)
    per_token = 2 * shape.tokens_bytes(1, shape.heads_q) + shape.batch * shape.heads_q * (
        shape.acc_itemsize
    )  # q, out and lse
    saved = tuple(n * per_token + 2 * world * kv for n in shard_sizes(shape.seq_len, world, layout))
    return Cost((2 * (world - 1) * kv,) * world, (2 * (world - 1) * kv_acc,) * world, saved)


def _kv_heads_on_the_wire(shape: Shape, degree: int) -> int:
    """Hkv, times W/Hkv when there are fewer K/V heads than Ulysses ranks (each is replicated)."""
    return shape.heads_kv * max(1, degree // shape.heads_kv)


def _ulysses_all_to_alls(shape: Shape, tokens: int, degree: int) -> int:
    """Bytes a rank sends in one phase of Ulysses over ``degree`` = U ranks, shards padded to
    ``tokens`` = L, the group's largest (S/W when W divides S).

    Four all-to-alls of its (B, L, H, D) tensors, in the inputs' dtype: q, k, v, out forward;
    dout, dq, dk, dv backward. Each puts ``(U-1)/U`` of the tensor on the wire (see Design,
    *The ledger*).
    """
    q_like = shape.tokens_bytes(tokens, shape.heads_q)
    kv_like = shape.tokens_bytes(tokens, _kv_heads_on_the_wire(shape, degree))
    return sum(wire_bytes("all_to_all", t, degree) for t in (q_like, kv_like, kv_like, q_like))


def ulysses(shape: Shape, world: int, *, layout: str = "contiguous") -> Cost:
    """DeepSpeed-Ulysses (Jacobs et al. 2023) over W ranks, per rank (any ``layout``: the same).

    Forward: all-to-alls of q, k, v (sequence -> heads) and of out (heads -> sequence); backward:
    of dout, and of dq, dk, dv back; all in the inputs' dtype. Per phase
    ``(W-1)/W·(2·B·(S/W)·Hq·D + 2·B·(S/W)·Hkv'·D)`` elements, ``Hkv' = Hkv·max(1, W/Hkv)``;
    when W does not divide S the shards travel padded to ``L = ceil(S/W)``: read L for S/W.
    USP Table 2 (v5) counts SP-Ulysses as 8 all-to-alls per layer, ``(8/N)·O(bs·L·d)`` per device:
    the same 4 + 4, each ≈ bs·L·d/N elements with d = Hq·D and (N-1)/N rounded to 1. Ours counts
    exact bytes, and K, V (and dK, dV) differ from the paper's d: under GQA they have Hkv < Hq
    heads (the paper's GQA formula ``(4/N)·O(bs·L·d) + (4/N)·O(bs·L·d/G)``), and when Hkv < W each
    K/V head is replicated W/Hkv times, so they carry W heads, more than Hkv (MQA: W times).
    Saved: the heads-layout q, k, v, out (B, S, H/W, D) and lse (B, Hq/W, S), padding dropped:
    O(S/W).
    """
    heads_kv = _kv_heads_on_the_wire(shape, world)
    q_or_out = shape.tokens_bytes(shape.seq_len, shape.heads_q // world)
    kv = shape.tokens_bytes(shape.seq_len, heads_kv // world)
    lse = shape.batch * (shape.heads_q // world) * shape.seq_len * shape.acc_itemsize
    # L = ceil(S/W): the largest shard under every layout
    per_phase = _ulysses_all_to_alls(shape, -(-shape.seq_len // world), world)
    return same_for_every_rank(world, per_phase, per_phase, 2 * q_or_out + 2 * kv + lse)


def usp(shape: Shape, *, ulysses: int, ring: int, layout: str = "contiguous") -> Cost:
    """USP (Fang & Zhao 2024) on a mesh of U ulysses x R ring ranks (W = U·R), per rank.

    Ulysses' four all-to-alls per phase inside each group of U ranks, around ring attention over
    R ranks on each rank's gathered T_i tokens (ring rank i's: S/R when R divides S) and its
    Hq/U, Hkv'/U heads (``Hkv' = Hkv·max(1, U/Hkv)``): the ring part costs exactly ``ring`` of
    that sub-shape, bytes and saved tensors alike. So U = W is ``ulysses`` and U = 1 is ``ring``.
    Uneven shards: group i's all-to-alls pad to its largest shard, ``L_i = ceil(T_i/U)``.
    USP Table 2 (v5) bounds SP-Unified's activation traffic by ``≤ 4·O(bs·L·d)`` (P2P + 8
    all-to-alls); ours is exact bytes, the ring's dK, dV accumulators in the accumulation dtype.
    Saved: q, k, v, out (B, T_i, H/U, D) and lse (B, Hq/U, T_i), heads layout: O(S/W).
    """
    world = ulysses * ring
    heads_q, heads_kv = shape.heads_q // ulysses, _kv_heads_on_the_wire(shape, ulysses) // ulysses
    per_ring_rank = Shape(
        shape.batch, shape.seq_len, heads_q, heads_kv, shape.head_dim, shape.dtype
    )
    ring_sizes = shard_sizes(shape.seq_len, ring, layout)  # T_i
    ring_part = _ring_of_blocks(per_ring_rank, ring_sizes)
    # ring index i = rank // U; its group pads to L_i = ceil(T_i / U)
    all_to_alls = [_ulysses_all_to_alls(shape, -(-ring_sizes[r // ulysses] // ulysses), ulysses)
                   for r in range(world)]  # fmt: skip
    return Cost(
        tuple(a + ring_part.forward[r // ulysses] for r, a in enumerate(all_to_alls)),
        tuple(a + ring_part.backward[r // ulysses] for r, a in enumerate(all_to_alls)),
        tuple(ring_part.saved[r // ulysses] for r in range(world)),
    )
