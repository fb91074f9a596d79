"""Where block attention is computed: plain torch (``sptutor.blocks``) or our Triton kernels.

``backend="auto"`` is ``"triton"`` for CUDA tensors and ``"torch"`` for CPU tensors (DESIGN §4).
Both backends take and return the same shapes, so a method's step loop does not care which runs.
"""

from __future__ import annotations

import torch

from sptutor import blocks
from sptutor import layout as layout_

BACKENDS = ("auto", "torch", "triton")
TRITON_KERNELS_WRITTEN = False  # the [kernels] issue wires sptutor.kernels in


def resolve(backend: str, like: torch.Tensor) -> str:
    """The concrete backend for tensors like ``like``; ValueError if unknown or unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if like.is_cuda and TRITON_KERNELS_WRITTEN else "torch"
    if backend == "triton" and not TRITON_KERNELS_WRITTEN:
        raise ValueError(
            "backend='triton' needs the Triton kernels of sptutor.kernels, which are not written "
            "yet; use backend='torch'"
        )
    return backend


def prepare(
    q: torch.Tensor, *, world: int, layout: str, backend: str, scale: float | None, ulysses: int = 1
) -> tuple[list[torch.Tensor], str, float]:
    """What a softmax method derives from its arguments before its first message.

    q: (B, S/W, Hq, D) this rank's queries. Returns every rank's positions (W x (S/W,), layout
    sizes checked), the concrete backend and the scale (default D ** -0.5).
    """
    positions = layout_.all_positions(
        q.shape[1] * world, world=world, layout=layout, ulysses=ulysses, device=q.device
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return positions, resolve(backend, q), scale


def attention_forward(backend: str, q, k, v, q_pos, k_pos, causal: bool, scale: float):
    """One block forward on ``backend``: see ``blocks.attention_block`` for shapes."""
    return blocks.attention_block(q, k, v, q_pos, k_pos, causal, scale)


def attention_backward(
    backend: str, dout, q, k, v, out, lse, q_pos, k_pos, causal: bool, scale: float
):
    """One block backward on ``backend``: see ``blocks.attention_block_backward`` for shapes."""
    return blocks.attention_block_backward(dout, q, k, v, out, lse, q_pos, k_pos, causal, scale)
