"""The two scans linear attention is made of, as Triton kernels.

Both walk the sequence in sub-chunks of BLOCK_T tokens and carry a state tile
``(BLOCK_DK, BLOCK_DV)`` in registers: one program per (column slice of the state, batch·head).
Inside a sub-chunk the causal part is a masked ``(T x T)`` product, across sub-chunks the state
carries the rest (the chunk formula of Design, *Linear attention*, at the sub-chunk scale). With
offsets i, j in the sub-chunk of n valid tokens: ``M_ij = decay^(i-j)`` (i >= j),
``a_i = decay^(i+1)``, ``b_j = decay^(n-1-j)``, ``g = decay^n``.

- :func:`_scan_forward_kernel` (first to last sub-chunk):
  ``O_t = [(Q_t K_t^T) ⊙ M] V_t + diag(a) Q_t S``, then ``S = g·S + K_t^T diag(b) V_t``.
- :func:`_scan_backward_kernel` (last to first):
  ``dV_t = [(K_t Q_t^T) ⊙ M^T] dO_t + diag(b) K_t dS``, then ``dS = g·dS + Q_t^T diag(a) dO_t``.

Non-causal (no decay): the forward sums ``S = S_in + K^T V`` over every sub-chunk first, then reads
``O = Q S``; the backward sums ``dS = dS_out + Q^T dO``, then ``dV = K dS``.
``linear_attention.py`` assembles the forward and every gradient from these two scans.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decay_weights(LOG_DECAY, head, n_valid, BLOCK_T: tl.constexpr, HAS_DECAY: tl.constexpr):
    """M (T, T), a (T,), b (T,), g of a sub-chunk with ``n_valid`` tokens (decay = e^LOG_DECAY)."""
    offs = tl.arange(0, BLOCK_T)
    causal = offs[:, None] >= offs[None, :]
    if HAS_DECAY:
        log_decay = tl.load(LOG_DECAY + head)
        mask = tl.where(causal, tl.exp(log_decay * (offs[:, None] - offs[None, :])), 0.0)
        q_decay = tl.exp(log_decay * (offs + 1))  # a_i = decay^(i+1)
        k_decay = tl.exp(log_decay * (n_valid - 1 - offs))  # b_j = decay^(n-1-j)
        chunk_decay = tl.exp(log_decay * n_valid)  # g = decay^n
    else:
        mask = tl.where(causal, 1.0, 0.0)
        q_decay = tl.full([BLOCK_T], 1.0, tl.float32)
        k_decay = q_decay
        chunk_decay = 1.0
    return mask, q_decay, k_decay, chunk_decay


@triton.jit
def _scan_forward_kernel(
    Q, K, V, STATE_IN, OUT, STATE_OUT, LOG_DECAY,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    seq_len, heads_q, head_dim,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Columns ``cols`` of out: (B, S, Hq, D) and of the state (B, Hq, D, D), one (batch, head).

    Q and OUT share q's strides; K, V (Hkv heads, head // GROUP) share k's.
    """
    col_slice, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // heads_q, batch_head % heads_q
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_DK)
    cols = col_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_ok, col_ok = offs_k < head_dim, cols < head_dim
    q_base = batch.to(tl.int64) * stride_qb + head * stride_qh
    k_base = batch.to(tl.int64) * stride_kb + (head // GROUP) * stride_kh  # GQA by indexing
    state_offsets = batch_head.to(tl.int64) * head_dim * head_dim
    state_offsets += offs_k[:, None] * head_dim + cols[None, :]
    state_mask = k_ok[:, None] & col_ok[None, :]
    acc_dtype = STATE_OUT.dtype.element_ty
    if HAS_STATE:
        state = tl.load(STATE_IN + state_offsets, mask=state_mask, other=0.0).to(acc_dtype)
    else:
        state = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=acc_dtype)
    if not CAUSAL:  # S = S_in + K^T V over the whole sequence first
        for start in range(0, seq_len, BLOCK_T):
            rows = start + offs_t
            row_ok = rows < seq_len
            k = tl.load(K + k_base + rows[:, None] * stride_ks + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + k_base + rows[:, None] * stride_ks + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            state = tl.dot(tl.trans(k), v, state, input_precision="ieee")
    for start in range(0, seq_len, BLOCK_T):
        rows = start + offs_t
        row_ok = rows < seq_len
        q = tl.load(Q + q_base + rows[:, None] * stride_qs + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        if CAUSAL:
            k = tl.load(K + k_base + rows[:, None] * stride_ks + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + k_base + rows[:, None] * stride_ks + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            mask, q_decay, k_decay, chunk_decay = _decay_weights(
                LOG_DECAY, head, tl.minimum(seq_len - start, BLOCK_T), BLOCK_T, HAS_DECAY
            )
            # O_t = [(Q_t K_t^T) ⊙ M] V_t + diag(a) Q_t S  (the state of the tokens before t)
            weights = tl.dot(q, tl.trans(k), input_precision="ieee") * mask
            out = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
            q_scaled = (q * q_decay[:, None]).to(q.dtype)
            out = tl.dot(q_scaled, state.to(q.dtype), out, input_precision="ieee")
            # S = g·S + K_t^T diag(b) V_t
            k_scaled = (k * k_decay[:, None]).to(k.dtype)
            state = tl.dot(tl.trans(k_scaled), v, state * chunk_decay, input_precision="ieee")
        else:
            out = tl.dot(q, state.to(q.dtype), input_precision="ieee")  # O = Q S
        tl.store(OUT + q_base + rows[:, None] * stride_qs + cols[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip
    if STORE_STATE:
        tl.store(STATE_OUT + state_offsets, state, mask=state_mask)


@triton.jit
def _scan_backward_kernel(
    Q, K, DOUT, DSTATE_OUT, DV, DSTATE_IN, LOG_DECAY,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    seq_len, heads_kv, head_dim,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr,
    HAS_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Columns ``cols`` of dV: (B, S, Hkv, D), summed over the G query heads of one K/V head, and
    of each query head's dS_in: (B, Hq, D, D).

    Q and DOUT share q's strides; K and DV (zero-initialised, accumulation dtype) share k's. Each
    program owns its dV columns and adds the G heads' shares in turn: no atomics.
    """
    col_slice, batch_kv_head = tl.program_id(0), tl.program_id(1)
    batch, kv_head = batch_kv_head // heads_kv, batch_kv_head % heads_kv
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_DK)
    cols = col_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_ok, col_ok = offs_k < head_dim, cols < head_dim
    k_base = batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    state_mask = k_ok[:, None] & col_ok[None, :]
    acc_dtype = DV.dtype.element_ty
    last = (tl.cdiv(seq_len, BLOCK_T) - 1) * BLOCK_T  # start of the last sub-chunk
    for group_index in range(GROUP):  # the query heads sharing this K/V head (GQA), in turn
        head = kv_head * GROUP + group_index
        q_base = batch.to(tl.int64) * stride_qb + head * stride_qh
        state_offsets = (batch.to(tl.int64) * heads_kv * GROUP + head) * head_dim * head_dim
        state_offsets += offs_k[:, None] * head_dim + cols[None, :]
        if HAS_STATE:
            dstate = tl.load(DSTATE_OUT + state_offsets, mask=state_mask, other=0.0).to(acc_dtype)
        else:
            dstate = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=acc_dtype)
        if not CAUSAL:  # dS = dS_out + Q^T dO over the whole sequence first
            for start in range(0, seq_len, BLOCK_T):
                rows = start + offs_t
                row_ok = rows < seq_len
                q = tl.load(Q + q_base + rows[:, None] * stride_qs + offs_k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                dout = tl.load(DOUT + q_base + rows[:, None] * stride_qs + cols[None, :],
                               mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                dstate = tl.dot(tl.trans(q), dout, dstate, input_precision="ieee")
        for step in range(0, seq_len, BLOCK_T):  # sub-chunks from last to first
            start = last - step
            rows = start + offs_t
            row_ok = rows < seq_len
            k = tl.load(K + k_base + rows[:, None] * stride_ks + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            dv_offsets = k_base + rows[:, None] * stride_ks + cols[None, :]
            dv_mask = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                q = tl.load(Q + q_base + rows[:, None] * stride_qs + offs_k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                dout = tl.load(DOUT + q_base + rows[:, None] * stride_qs + cols[None, :],
                               mask=dv_mask, other=0.0)  # fmt: skip
                mask, q_decay, k_decay, chunk_decay = _decay_weights(
                    LOG_DECAY, head, tl.minimum(seq_len - start, BLOCK_T), BLOCK_T, HAS_DECAY
                )
                # dV_t = [(K_t Q_t^T) ⊙ M^T] dO_t + diag(b) K_t dS  (dS: of the state after t)
                weights_t = tl.dot(k, tl.trans(q), input_precision="ieee") * tl.trans(mask)
                dv = tl.dot(weights_t.to(dout.dtype), dout, input_precision="ieee")
                k_scaled = (k * k_decay[:, None]).to(k.dtype)
                dv = tl.dot(k_scaled, dstate.to(k.dtype), dv, input_precision="ieee")
                # dS = g·dS + Q_t^T diag(a) dO_t  (the gradient of the state before t)
                q_scaled = (q * q_decay[:, None]).to(q.dtype)
                dstate = tl.dot(tl.trans(q_scaled), dout, dstate * chunk_decay,
                                input_precision="ieee")  # fmt: skip
            else:
                dv = tl.dot(k, dstate.to(k.dtype), input_precision="ieee")  # dV = K dS
            dv += tl.load(DV + dv_offsets, mask=dv_mask, other=0.0)  # add to earlier heads' share
            tl.store(DV + dv_offsets, dv.to(acc_dtype), mask=dv_mask)
        if STORE_STATE:
            tl.store(DSTATE_IN + state_offsets, dstate, mask=state_mask)
