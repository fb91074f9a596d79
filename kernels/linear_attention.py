"""Chunked linear attention in Triton: the chunk of ``sptutor.chunks`` with its state, fused.

The contract of :func:`sptutor.chunks.forward` and :func:`sptutor.chunks.backward` (see Design,
*Linear attention*): unnormalised, causal with a per-head decay, an incoming state
``KV_p0: (B, Hq, D, D)`` (one per query head) and the outgoing ``KV_out``; K/V heads are indexed,
never repeated (GQA/MQA). Every result is one of two scans (``_linear_scans.py``): the forward
scan carries the state first to last, the backward scan carries its gradient last to first, and
the gradients are the same two scans with the roles of q, k, v, dO swapped:

- ``dQ``: forward scan of (dO, V, K) from ``KV_p0^T`` (``dq_i = sum_j decay^(i-j)(dO_i·v_j) k_j
  + decay^(i+1) dO_i KV_p0^T``);
- ``dV`` and ``dKV_p0``: backward scan of (Q, K, dO) from ``dKV_out``;
- ``dK``: backward scan of (dO, V, Q) from ``dKV_out^T`` (``dk_j = sum_i decay^(i-j)(dO_i·v_j)
  q_i + decay^(C-1-j) v_j dKV_out^T``).
"""

from __future__ import annotations

import torch
import triton

from sptutor.kernels import _tiles
from sptutor.kernels._linear_scans import _scan_backward_kernel, _scan_forward_kernel
from sptutor.kernels._tiles import TileConfig


def _check(q, k, v, decay, causal, **states):
    """Shapes, dtypes, devices, one length, the decay rule (sptutor.checks) and the states'
    shapes, before any launch."""
    from sptutor.checks import check_decay

    _tiles.check_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must have one length, got S={q.shape[1]} and {k.shape[1]}")
    check_decay(decay, q, causal)
    batch, _, heads_q, head_dim = q.shape
    for name, state in states.items():
        if state is not None and state.shape != (batch, heads_q, head_dim, head_dim):
            raise ValueError(
                f"{name} must be (B, Hq, D, D) = {(batch, heads_q, head_dim, head_dim)}, "
                f"got {tuple(state.shape)}"
            )


def _scan(kernel, q, k, v, state, out, state_out, decay, causal, store_state, cfg):
    """Launch one scan: ``q`` has Hq heads, ``k``, ``v`` and ``out`` share k's layout for the
    backward scan (out = dV), q's for the forward (out = O)."""
    batch, seq_len, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    acc = _tiles.accumulation_dtype(q.dtype)
    log_decay = None if decay is None else torch.log(decay.to(device=q.device, dtype=acc))
    heads = heads_q if kernel is _scan_forward_kernel else heads_kv
    grid = (triton.cdiv(head_dim, cfg.block_n), batch * heads)
    state = None if state is None else state.to(acc).contiguous()
    kernel[grid](
        q, k, v, state, out, state_out, log_decay,
        *_tiles.strides(q), *_tiles.strides(k), seq_len, heads, head_dim,
        GROUP=heads_q // heads_kv, CAUSAL=causal, HAS_DECAY=decay is not None,
        HAS_STATE=state is not None, STORE_STATE=store_state, BLOCK_T=cfg.block_m,
        BLOCK_DK=_tiles.block_d(head_dim), BLOCK_DV=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def linear_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    decay: torch.Tensor | None = None,
    causal: bool = True,
    out_dtype: torch.dtype | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention of one chunk of C tokens that follows the state ``KV_p0``.

    Args:
        q: (B, C, Hq, D) queries, D <= 256 (feature maps are the caller's business).
        k: (B, C, Hkv, D) keys, Hq % Hkv == 0.
        v: (B, C, Hkv, D) values.
        state: (B, Hq, D, D) ``KV_p0``, the state after the tokens before the chunk, or None (= 0).
        decay: (Hq,) per-head decay in (0, 1], or None (= 1); causal only, not differentiable.
        causal: ``o_i = [(Q K^T) ⊙ M] V + decay^(i+1) q_i KV_p0`` (see Design, *Linear
            attention*). Non-causal, the chunk's queries see every key so far:
            ``o_i = q_i (KV_p0 + K^T V)``.
        out_dtype: dtype of ``out``, default q's.
        config: ``block_m`` tokens per sub-chunk, ``block_n`` state columns per program.

    Returns:
        out: (B, C, Hq, D), and state_out: (B, Hq, D, D) ``KV_out = decay^C KV_p0 + sum_i
        decay^(C-1-i) k_i^T v_i`` (non-causal ``KV_p0 + K^T V``), float32 (float64 for float64
        inputs), to hand to the next chunk.
    """
    _check(q, k, v, decay, causal, state=state)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, _, heads_q, head_dim = q.shape
    acc = _tiles.accumulation_dtype(q.dtype)
    cfg = config or _tiles.linear_config(head_dim, q.dtype)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    state_out = torch.empty(batch, heads_q, head_dim, head_dim, dtype=acc, device=q.device)
    _scan(_scan_forward_kernel, q, k, v, state, out, state_out, decay, causal, True, cfg)
    return out, state_out


def linear_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    state: torch.Tensor | None = None,
    decay: torch.Tensor | None = None,
    causal: bool = True,
    dstate_out: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`linear_attention_forward`, written out (no autograd).

    The keywords of the forward, plus ``dstate_out``; the same results, in the same order, as
    ``sptutor.chunks.backward(dout, dstate_out, q, k, v, state, decay)``.

    Args:
        dout: (B, C, Hq, D) gradient of ``out``.
        q: (B, C, Hq, D) queries, as in the forward.
        k: (B, C, Hkv, D) keys.
        v: (B, C, Hkv, D) values.
        state: (B, Hq, D, D) ``KV_p0`` the forward started from, or None (= 0).
        decay: (Hq,) the forward's decay, or None (= 1).
        causal: as in the forward.
        dstate_out: (B, Hq, D, D) gradient of ``state_out`` (``dKV_out``, from the next chunk),
            or None (= 0: no later chunk).
        grad_dtype: dtype of dq, dk, dv, default q's.
        config: ``block_m`` tokens per sub-chunk, ``block_n`` state columns per program.

    Returns:
        dq: (B, C, Hq, D), dk, dv: (B, C, Hkv, D), and dstate: (B, Hq, D, D) ``dKV_p0``, the
        gradient of the incoming state (float32, float64 for float64 inputs) to hand to the
        previous chunk. Returned even when ``state`` is None. Deterministic (no atomics).
    """
    _check(q, k, v, decay, causal, state=state, dstate_out=dstate_out)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.to(q.dtype).contiguous()
    acc = _tiles.accumulation_dtype(q.dtype)
    cfg = config or _tiles.linear_config(q.shape[-1], q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)  # the backward scan adds into them
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dstate = torch.empty(q.shape[0], q.shape[2], q.shape[3], q.shape[3], dtype=acc, device=q.device)
    unused = torch.empty_like(dstate)
    state_t = None if state is None else state.transpose(-1, -2)
    dstate_out_t = None if dstate_out is None else dstate_out.transpose(-1, -2)
    # dQ: forward scan of (dO, V, K) from KV_p0^T
    _scan(_scan_forward_kernel, dout, v, k, state_t, dq, unused, decay, causal, False, cfg)
    # dV and dKV_p0: backward scan of (Q, K, dO) from dKV_out
    _scan(_scan_backward_kernel, q, k, dout, dstate_out, dv, dstate, decay, causal, True, cfg)
    # dK: backward scan of (dO, V, Q) from dKV_out^T
    _scan(_scan_backward_kernel, dout, v, q, dstate_out_t, dk, unused, decay, causal, False, cfg)
    dtype = grad_dtype or q.dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dstate
