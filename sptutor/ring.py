"""Ring attention on ``torch.distributed``: K and V blocks travel the ring, each rank merges by LSE.

Mirrors ``oracle/ring.py`` step for step (same step names, same order of messages); here each
process is one rank, and the next block's transfer is started before this block's compute so the
two overlap. In backward the dK, dV accumulators' hop overlaps too: started at the end of a step,
waited for only when the next step, its block gradients computed, adds to them. Which blocks to
compute is decided once, on the host, before the first message (``backends.prepare``): no step
waits on the device to learn whether its block is masked, so a GPU never idles between steps.

Forward (W steps): at step s this rank holds the K, V block of ``src = (rank - s) % W``, attends its
queries to it (masks from global positions) and merges by log-sum-exp (online softmax).
Backward (W steps): K and V travel again, the dK, dV accumulators travel with them, and one last
hop brings each accumulator home.
"""

from __future__ import annotations

import torch

from sptutor import backends, blocks, comm
from sptutor.checks import check_qkv


def _forward(q, k, v, positions, documents, visible, causal, scale, group, backend):
    """q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); positions: W x (S_i,), every group rank's
    (shards may differ by a token); documents: W x (S_i,) document ids, or W x None; visible:
    W bools, whether this rank's queries see any key of rank i's block (decided on the host).

    Returns out: (B, S_r, Hq, D) in q's dtype and lse: (B, Hq, S_r) in the accumulation dtype.
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    batch, seq_local, heads_q, _ = q.shape
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads_q, seq_local), float("-inf"), dtype=acc, device=q.device)
    # BEGIN SOLUTION ring forward: pass K, V on, attend to the block held, merge it by its LSE
    kv_from_prev_rank = [k, v]  # step 0: this rank's own
    for step in range(W):
        src = (rank - step) % W  # whose block this rank holds now
        if step < W - 1:  # start passing the block on; it travels while we compute
            shift = comm.ring_shift(kv_from_prev_rank, group, phase="forward", step=step,
                                    receive_tokens=len(positions[(src - 1) % W]))  # fmt: skip
        k_block, v_block = kv_from_prev_rank
        mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
        if visible[src]:  # a block the mask hides entirely is skipped
            block_out, block_lse = backends.attention_forward(
                backend, q, k_block, v_block, mine[0], theirs[0], causal, scale, mine[1], theirs[1]
            )
            # merge partial outputs by their LSE (online softmax)
            out, lse = blocks.merge(out, lse, block_out, block_lse)
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
    # END SOLUTION
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, positions, documents, visible, causal, scale, group,
              backend):  # fmt: skip
    """dout, out: (B, S_r, Hq, D); lse: (B, Hq, S_r); q, k, v, positions, documents, visible
    as in ``_forward``.

    Returns dq: (B, S_r, Hq, D) and dk, dv: (B, S_r, Hkv, D), in q's dtype.
    """
    rank, W = comm.rank_and_size(group)
    acc = blocks.accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # BEGIN SOLUTION ring backward: K, V travel again with the dK, dV accumulators; one hop home
    kv_from_prev_rank = [k, v]
    dkv_from_prev_rank = [torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2)]
    dkv_shift = None  # the accumulators on their way in, while this step computes
    for step in range(W):
        src = (rank - step) % W
        incoming = len(positions[(src - 1) % W])  # tokens of the block the previous rank holds
        if step < W - 1:
            shift = comm.ring_shift(kv_from_prev_rank, group, phase="backward", step=step,
                                    receive_tokens=incoming)  # fmt: skip
        k_block, v_block = kv_from_prev_rank
        mine, theirs = (positions[rank], documents[rank]), (positions[src], documents[src])
        if visible[src]:
            block_dq, block_dk, block_dv = backends.attention_backward(
                backend, dout, q, k_block, v_block, out, lse,
                mine[0], theirs[0], causal, scale, mine[1], theirs[1],
            )  # fmt: skip
            dq += block_dq
        if dkv_shift is not None:  # only now wait for the accumulators of the block held
            dkv_from_prev_rank = dkv_shift.wait()
        if visible[src]:
            dk_acc, dv_acc = dkv_from_prev_rank
            dkv_from_prev_rank = [dk_acc + block_dk, dv_acc + block_dv]
        # dK, dV accumulators travel with their block, during the next step's compute; after the
        # last step this hop brings them home
        dkv_shift = comm.ring_shift(dkv_from_prev_rank, group, phase="backward", step=step,
                                    receive_tokens=incoming)  # fmt: skip
        if step < W - 1:
            kv_from_prev_rank = shift.wait()
    dkv_from_prev_rank = dkv_shift.wait()
    # END SOLUTION
    dk, dv = dkv_from_prev_rank
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, visible, causal, scale, group, backend):
        out, lse = _forward(q, k, v, positions, documents, visible, causal, scale, group, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (positions, documents, visible, causal, scale, group, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    layout: str = "contiguous",
    group=None,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """Ring attention on (B, S_r, H, D) shards, sequence before heads, over ``group``'s ranks.

    Call on every rank of ``group`` with its own shards.

    q: (B, S_r, Hq, D) this rank's queries; k, v: (B, S_r, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout)[rank]`` makes them (S_r = S/W, or one
    token more or fewer when W does not divide S: then pass ``seq_len=S``).
    ``cu_seqlens``: (N+1,) offsets of packed documents over the global sequence (the same
    tensor on every rank): a query sees only keys of its own document.
    Returns out: (B, S_r, Hq, D) this rank's output (differentiable), and with ``return_lse``
    also lse: (B, Hq, S_r) (detached, float32; float64 for float64 inputs).
    """
    check_qkv(q, k, v)
    positions, documents, visible, backend, scale = backends.prepare(
        "ring", q, k, group=group, causal=causal, layout=layout, backend=backend, scale=scale,
        return_lse=return_lse, seq_len=seq_len, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    rank = comm.rank_and_size(group)[0]
    out, lse = _RingAttention.apply(
        q, k, v, positions, documents, visible[rank], causal, scale, group, backend
    )
    return (out, lse) if return_lse else out
