"""Input checks shared by the oracle and the real code (see Design, *Errors*).

Every check raises before any communication, with a sentence naming the precondition and the
values that broke it.
"""

from __future__ import annotations

import os

import torch


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = True
) -> None:
    """q: (B, S, Hq, D), k, v: (B, S, Hkv, D) of one floating dtype and device, Hq % Hkv == 0.

    Self-attention (``same_length``, every method): q and k hold the same tokens (a full
    sequence, or one rank's shard of it). The ground truth also takes S_q != S_k.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v need one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise TypeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (batch, _, heads_q, head_dim), (batch_kv, _, heads_kv, head_dim_kv) = q.shape, k.shape
    if batch != batch_kv or head_dim != head_dim_kv:
        raise ValueError(
            f"q and k must agree on B and D, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if heads_q % heads_kv:
        raise ValueError(f"need Hq % Hkv == 0, got Hq={heads_q}, Hkv={heads_kv}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q and k must have one sequence length, got {q.shape[1]} and {k.shape[1]}"
            + ("; if these are (B, H, S, D) tensors, transpose them: sptutor takes (B, S, H, D)"
               if q.shape[2] == k.shape[2] else "")
        )  # fmt: skip
    check_finite(q=q, k=k, v=v)


def check_finite(**tensors: torch.Tensor) -> None:
    """With ``SPTUTOR_CHECK_FINITE=1`` (off by default: it costs a pass over each tensor and a
    host sync; sptutor's tests turn it on), NaN or inf in an input is a ValueError."""
    if os.environ.get("SPTUTOR_CHECK_FINITE", "0") != "1":
        return
    for name, x in tensors.items():
        bad = int((~torch.isfinite(x.detach())).sum())  # detached: autograd must save nothing
        if bad:
            raise ValueError(f"{name} holds {bad} NaN or inf value(s) of {x.numel()}")


def check_positions(pos: torch.Tensor | None, length: int, name: str) -> None:
    """pos: None (= arange) or an integer (length,) tensor of global positions."""
    if pos is None:
        return
    if not isinstance(pos, torch.Tensor) or pos.dtype.is_floating_point or pos.is_complex():
        raise TypeError(f"{name} must be an integer torch.Tensor, got {_describe(pos)}")
    if pos.shape != (length,):
        raise ValueError(
            f"{name} must have shape ({length},), one position per token, got {tuple(pos.shape)}"
        )


def check_decay(decay: torch.Tensor | None, q: torch.Tensor, causal: bool) -> None:
    """decay: None, or a floating (Hq,) tensor in (0, 1] on q's device that does not require
    grad, causal only; q: (B, S, Hq, D) the queries it decays."""
    if decay is None:
        return
    if not causal:
        raise ValueError(
            "decay needs causal=True: non-causal linear attention has no order to decay along"
        )
    if not isinstance(decay, torch.Tensor) or not decay.dtype.is_floating_point:
        raise TypeError(f"decay must be a floating torch.Tensor, got {_describe(decay)}")
    if decay.device != q.device:
        raise TypeError(f"decay must be on q's device {q.device}, got {decay.device}")
    if decay.requires_grad:
        raise ValueError("decay must not require grad: it is a fixed per-head constant")
    heads_q = q.shape[2]
    if decay.shape != (heads_q,):
        raise ValueError(f"decay must have shape (Hq,) = ({heads_q},), got {tuple(decay.shape)}")
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(
            f"decay must lie in (0, 1], got min={decay.min().item()}, max={decay.max().item()}"
        )


def _describe(x: object) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def check_ulysses_heads(heads_q: int, heads_kv: int, degree: int) -> None:
    """Ulysses splits heads over ``degree`` = U ranks: Hq % U == 0, and the K/V heads either split
    too (Hkv % U == 0) or are replicated U/Hkv times so each rank gets one (U % Hkv == 0, e.g. MQA).
    """
    if heads_q % degree or (heads_kv % degree and degree % heads_kv):
        raise ValueError(
            "ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), "
            f"got Hq={heads_q}, Hkv={heads_kv}, U={degree}"
        )


def check_linear_layout(layout: str) -> None:
    """lasp and lasp2 take the contiguous layout only: the state is a running sum in sequence order.

    Rank r must own the r-th chunk of the sequence, so that the state it receives (LASP) or
    combines from the ranks before it (LASP-2) covers exactly the tokens before its own.
    """
    if layout != "contiguous":
        raise ValueError(
            "lasp and lasp2 need the contiguous layout: the state runs through the sequence in "
            f"order, so rank r must own the r-th chunk, got layout={layout!r}"
        )
