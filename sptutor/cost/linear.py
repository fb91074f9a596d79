"""Closed forms of linear attention: LASP and LASP-2, per rank."""

from __future__ import annotations

import itertools

import torch

from sptutor.cost.shapes import Cost, Shape, shard_sizes


def _state_bytes(shape: Shape) -> int:
    """Bytes of one linear-attention state (B, Hq, D, D) in the accumulation dtype."""
    return shape.batch * shape.heads_q * shape.head_dim**2 * shape.acc_itemsize


def _linear_saved(shape: Shape, world: int, state_saved: tuple[bool, ...]) -> tuple[int, ...]:
    """Per rank: its q, k, v shards (S_r tokens, contiguous), plus one state where
    ``state_saved[rank]``."""
    per_token = shape.tokens_bytes(1, shape.heads_q) + 2 * shape.tokens_bytes(1, shape.heads_kv)
    sizes = shard_sizes(shape.seq_len, world)
    return tuple(n * per_token + (_state_bytes(shape) if kept else 0)
                 for n, kept in zip(sizes, state_saved))  # fmt: skip


def states_read(
    shape: Shape, world: int, causal: bool, cu_seqlens: torch.Tensor | None = None
) -> tuple[bool, ...]:
    """Which ranks read (and so keep for backward) an incoming state: non-causal every rank;
    causal every rank but 0, except a rank whose chunk starts a document (``cu_seqlens`` (N+1,)
    offsets: its first position is one of them), which reads nothing."""
    if not causal:
        return (True,) * world
    starts = set() if cu_seqlens is None else set(cu_seqlens.tolist())
    firsts = [0, *itertools.accumulate(shard_sizes(shape.seq_len, world))][:world]
    return tuple(rank > 0 and first not in starts for rank, first in enumerate(firsts))


def lasp(shape: Shape, world: int, *, causal: bool, cu_seqlens=None) -> Cost:
    """LASP (Sun et al. 2024) over W ranks, per rank.

    A message is one state (B, Hq, D, D) in the accumulation dtype: ``B·Hq·D²`` elements whatever
    S is — the LASP-2 paper's "B·H·d² per step", with H = Hq here because states are per query
    head (see Design, *Linear attention*; under GQA, Hq/Hkv times a per-K/V-head state).
    Causal: the paper's 2(W−1) sequential steps: rank t sends KV to t+1 in forward (the last rank
    sends nothing) and dKV to t−1 in backward (rank 0 sends nothing).
    Non-causal (ours): one all-reduce of K^T V forward and one of Q^T dO backward,
    ``2·state·(W−1)//W`` each; the LASP-2 paper restates LASP-1 as a sequential scan there too.
    Saved: q, k, v shards and the state read — the received KV_p0 (state caching; none on rank 0,
    nor on a rank whose chunk starts a document of ``cu_seqlens``) or, non-causal, KV_total.
    Packed documents change no message: every rank still sends its state.
    """
    state = _state_bytes(shape)
    if causal:
        forward = tuple(state if rank < world - 1 else 0 for rank in range(world))
        backward = tuple(state if rank > 0 else 0 for rank in range(world))
    else:
        forward = backward = (2 * state * (world - 1) // world,) * world
    return Cost(forward, backward, _linear_saved(shape, world, states_read(shape, world, causal,
                                                                          cu_seqlens)))  # fmt: skip


def lasp2(shape: Shape, world: int, *, causal: bool, cu_seqlens=None) -> Cost:
    """LASP-2 (Sun et al. 2025) over W ranks, per rank.

    The paper's 2 collective steps per iteration, causal or not: one all-gather of the local states
    (B, Hq, D, D) forward and one of the local dKV backward, accumulation dtype, "B·H·d²" each as
    the paper counts a step. On the wire (see Design, *The ledger*) an all-gather of T bytes puts
    ``T·(W−1)`` on it per rank, so each rank sends ``state·(W−1)`` per phase: in total W times what
    LASP's chain sends, in one step instead of W−1.
    Saved: q, k, v shards and the state read — the prefix KV_p0 (none on rank 0, nor where a
    chunk starts a document) or KV_total.
    """
    gather = _state_bytes(shape) * (world - 1)
    saved = _linear_saved(shape, world, states_read(shape, world, causal, cu_seqlens))
    return Cost((gather,) * world, (gather,) * world, saved)
