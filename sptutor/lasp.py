"""LASP on ``torch.distributed``: linear attention whose only messages are D×D states, on a chain.

This process is rank t of the group and holds chunk t of the sequence (C_t tokens, S/W or one
more or fewer; contiguous layout: the state runs in sequence order). It first does the work that
needs nothing from the others — the intra-chunk output ``[(Q K^T) ⊙ M] V`` and its chunk's local
state ``sum_i decay^(C-1-i) k_i^T v_i`` — then, causal, a chain: rank t receives ``KV_p0`` from
rank t-1, hands ``KV_out = decay^C KV_p0 + local`` on to rank t+1 at once, then reads
``decay^(i+1) q_i KV_p0``. The received state is cached for backward ("state caching"), never
recomputed or resent. Backward runs the chain in reverse: rank t receives dKV_out from rank t+1
and sends ``dKV_p0 = decay^C dKV_out + sum_i decay^(i+1) q_i^T dO_i`` to rank t-1.
Non-causal: one all-reduce of every rank's ``K^T V``, read as ``q·KV_total``; backward one
all-reduce of ``Q^T dO``, then ``dk = v dKV^T``, ``dv = k dKV``.

Packed documents (causal only) cut the state (``sptutor.chain``): the chunk runs as segments, its
runs of one document; only a first segment that continues the previous chunk's document reads
KV_p0, KV_out is the last segment's (with KV_p0 carried only through a chunk of one continued
document), and dKV flows back the same way. The same messages travel whatever the documents.

States travel in the accumulation dtype (float32 for 16-bit inputs), one per query head:
``(B, Hq, D, D)`` (see Design, *Linear attention*). Each rank keeps its q, k, v shards and the
state it read (state_in: the received state, none on rank 0 or where its chunk starts a
document; non-causal the total) for backward, never the output. ``sptutor/lasp2.py`` reuses the
local work, the state gradients, the non-causal steps and the checks from here.

Mirrors ``oracle/lasp.py`` step for step; here each process is one rank, and a chain step is a
blocking ``comm.recv`` from the previous rank, then ``comm.send`` to the next: no cycle, so no
deadlock.
"""

from __future__ import annotations

import torch

from sptutor import agreement, backends, blocks, chunks, comm
from sptutor.chain import Chain, check_documents
from sptutor.checks import check_decay, check_qkv


def _state_like(q):
    """An empty state (B, Hq, D, D) in the accumulation dtype: the shape of every message."""
    batch, _, heads_q, head_dim = q.shape
    acc = blocks.accumulation_dtype(q.dtype)
    return q.new_empty((batch, heads_q, head_dim, head_dim), dtype=acc)


def _local_forward(q, k, v, decay, chain, rank, needs_state, backend):
    """Work that waits for nobody: the intra-chunk output, segment by segment (no state crosses a
    document), and the local state (the last segment's) if ``needs_state``.

    Returns out: (B, C, Hq, D) and local_state: (B, Hq, D, D) or None (``backends``: torch pieces,
    or one fused Triton kernel per segment).
    """
    segments = chain.segments[rank]
    return backends.linear_local_forward(backend, q, k, v, decay, needs_state, segments)


def _local_backward(dout, q, k, v, state_in, decay, chain, rank, needs_dstate, backend):
    """Work that waits for nobody: intra-chunk gradients segment by segment, dq through the state
    read in forward, and the local dKV ``sum_i decay^(i+1) q_i^T dO_i`` if ``needs_dstate``
    (i over the first segment if it read the state; zero if the chunk starts a document).

    Returns dq: (B, C, Hq, D), dk, dv: (B, C, Hkv, D), local_dstate: (B, Hq, D, D) or None.
    """
    return backends.linear_local_backward(
        backend, dout, q, k, v, state_in, decay, needs_dstate, chain.segments[rank],
        chain.reads[rank],
    )  # fmt: skip


def _add_state_gradients(dk, dv, dkv_out, k, v, decay, last):
    """dk, dv plus those of this rank's local state (its last segment, ``last``), given dKV_out
    (None: no later chunk reads it)."""
    if dkv_out is None:
        return dk, dv
    dk_state, dv_state = chunks.local_state_backward(dkv_out, k[:, last], v[:, last], decay)
    dk[:, last] += dk_state
    dv[:, last] += dv_state
    return dk, dv


def _forward(q, k, v, decay, chain, group, backend):
    """LASP, causal. q: (B, C, Hq, D); k, v: (B, C, Hkv, D); decay: (Hq,) or None; chain: where
    the state flows (``sptutor.chain.Chain``, every rank's).

    Returns out: (B, C, Hq, D) (accumulation dtype) and state_in: (B, Hq, D, D) or None.
    """
    rank, W = comm.rank_and_size(group)
    chunk = q.shape[1]
    # the last rank's state would go nowhere: it builds none
    out, local_state = _local_forward(q, k, v, decay, chain, rank, rank < W - 1, backend)
    # BEGIN SOLUTION lasp forward chain: receive KV_p0, pass KV_out on at once, then read KV_p0
    kv_from_prev_rank = None
    if rank > 0:  # step rank-1: rank t waits for rank t-1
        kv_from_prev_rank = comm.recv(
            _state_like(q), rank - 1, group, phase="forward", step=rank - 1
        )
    # state caching: kept for backward, never resent; a chunk that starts a document reads none
    state_in = kv_from_prev_rank if chain.reads[rank] else None
    if rank < W - 1:  # pass KV_out on first: the next rank waits for it, not for our output
        # KV_p0 flows on only through a chunk that is all one document, continued
        kv_through = state_in if chain.passes[rank] else None
        kv_out = chunks.carry(kv_through, local_state, decay, chunk)
        comm.send(kv_out, rank + 1, group, phase="forward", step=rank)
    if state_in is not None:  # read by the tokens of the document that continues
        first = chain.first(rank)
        out[:, first] += chunks.readout(q[:, first], state_in, decay)
    # END SOLUTION
    return out, state_in


def _backward(dout, q, k, v, state_in, decay, chain, group, backend):
    """LASP, causal: the chain in reverse. dout like q; state_in as ``_forward`` returned it.

    Returns dq: (B, C, Hq, D), dk, dv: (B, C, Hkv, D) (accumulation dtype).
    """
    rank, W = comm.rank_and_size(group)
    chunk = q.shape[1]
    # rank 0 read no state: it owes no dKV to anyone
    dq, dk, dv, local_dstate = _local_backward(
        dout, q, k, v, state_in, decay, chain, rank, rank > 0, backend
    )
    # BEGIN SOLUTION lasp backward chain: receive dKV_out, send dKV_p0 back, add state gradients
    dkv_out = None  # the gradient of the KV this rank sent forward
    if rank < W - 1:  # step W-2-rank: rank t waits for rank t+1
        dkv_from_next_rank = comm.recv(
            _state_like(q), rank + 1, group, phase="backward", step=W - 2 - rank
        )
        # none if the next chunk starts a document: it never read our KV
        dkv_out = dkv_from_next_rank if chain.reads[rank + 1] else None
    if rank > 0:  # pass dKV_p0 back first: the previous rank waits for it
        # dKV_out flows on only through a chunk of one continued document (local_dstate is
        # zero where the chunk starts a document: then nothing flows back)
        dkv_through = dkv_out if chain.passes[rank] else None
        dkv_in = chunks.carry(dkv_through, local_dstate, decay, chunk)
        comm.send(dkv_in, rank - 1, group, phase="backward", step=W - 1 - rank)
    dk, dv = _add_state_gradients(dk, dv, dkv_out, k, v, decay, chain.last(rank))
    # END SOLUTION
    return dq, dk, dv


def _all_reduce(state, group, phase):
    """LASP's non-causal sum of every rank's state: one all-reduce."""
    return comm.all_reduce(state, group, phase=phase)


def _forward_noncausal(q, k, v, group, sum_over_ranks):
    """Non-causal: ``KV_total = sum_t K_t^T V_t`` (``sum_over_ranks``: LASP's all-reduce, or
    LASP-2's all-gather and sum), read as ``q·KV_total``. Returns out and state_in = KV_total."""
    local_state = chunks.local_state(k, v, None, heads_q=q.shape[2])
    total = sum_over_ranks(local_state, group, "forward")
    return chunks.readout(q, total, None), total


def _backward_noncausal(dout, q, k, v, total, group, sum_over_ranks):
    """``dq = dO KV_total^T``; ``dKV_total = sum_t Q_t^T dO_t`` (summed like the forward);
    ``dk = V dKV_total^T``, ``dv = K dKV_total``."""
    dq = chunks.readout_backward(dout, total, None)
    local_dstate = chunks.local_dstate(q, dout, None)
    dtotal = sum_over_ranks(local_dstate, group, "backward")
    dk, dv = chunks.local_state_backward(dtotal, k, v, None)
    return dq, dk, dv


class _Lasp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, decay, chain, group, backend):
        if causal:
            out, state_in = _forward(q, k, v, decay, chain, group, backend)
        else:
            out, state_in = _forward_noncausal(q, k, v, group, _all_reduce)
        ctx.save_for_backward(q, k, v, state_in)  # the state read, never the output
        ctx.options = (causal, decay, chain, group, backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, state_in = ctx.saved_tensors
        causal, decay, chain, group, backend = ctx.options
        dout = dout.contiguous()
        if causal:
            dq, dk, dv = _backward(dout, q, k, v, state_in, decay, chain, group, backend)
        else:
            dq, dk, dv = _backward_noncausal(dout, q, k, v, state_in, group, _all_reduce)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _prepare(method, q, k, v, causal, decay, group, backend, seq_len, cu_seqlens):
    """Check everything this rank can see (before any message; see Design, *Errors*) and that
    every rank made the same call (``sptutor.agreement``, not logged, with S and cu_seqlens in
    the signature); returns the backend and the chain of every rank's chunk."""
    check_qkv(q, k, v)
    check_decay(decay, q, causal)
    agreement.check_membership(group, method)
    # the chunk's local work runs on the backend; non-causal pieces are single matmuls (torch)
    concrete = backends.resolve(backend, q)
    check_documents(method, causal, cu_seqlens is not None)
    positions, documents = backends.place(
        method, q, k, group=group, layout="contiguous", ulysses=1, seq_len=seq_len,
        cu_seqlens=cu_seqlens, device="cpu", causal=causal, decay=decay,
    )  # fmt: skip
    return concrete, Chain.of(positions, documents)


def lasp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    decay: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """LASP (Sun et al. 2024) on (B, C, H, D) shards, sequence before heads, over ``group``.

    Call on every rank of ``group`` with its own shards.

    q: (B, C, Hq, D) this rank's queries, C = S/W (or one token more or fewer when W does not
    divide S: then pass ``seq_len=S``); k, v: (B, C, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout="contiguous")[rank]`` makes them (the only layout);
    decay: (Hq,) in (0, 1], or None (= 1), causal only, not differentiable.
    ``cu_seqlens``: (N+1,) offsets of packed documents over the global sequence (the same tensor
    on every rank; causal only): the state starts afresh at every document.
    Causal: a chain of W-1 sends of KV (B, Hq, D, D) forward and W-1 of dKV backward.
    Non-causal: one all-reduce of K^T V forward, one of Q^T dO backward.
    Returns out: (B, C, Hq, D) this rank's output (differentiable), unnormalised (see Design,
    *Linear attention*).
    """
    backend, chain = _prepare("lasp", q, k, v, causal, decay, group, backend, seq_len, cu_seqlens)
    return _Lasp.apply(q, k, v, causal, decay, chain, group, backend)
