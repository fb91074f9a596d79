"""Triton kernels for block attention (imported as ``sptutor.kernels``).

- :func:`flash_attention_forward`, :func:`flash_attention_backward`: FlashAttention-2 with masks
  from global positions, the contract of ``sptutor.blocks.attention_block`` and its backward.
- :func:`linear_attention_forward`, :func:`linear_attention_backward`: chunked causal (or
  non-causal) linear attention with a per-head decay and an incoming state (DESIGN §2).
- ``TileConfig``: tile sizes and launch parameters, to tune on a GPU (``config=``).

On a machine without CUDA, importing this package sets ``TRITON_INTERPRET=1`` if the variable is
unset, so the kernels run on CPU tensors under the Triton interpreter (slow, for tests and
reading). Triton reads the variable when ``@triton.jit`` decorates a kernel, i.e. when the kernel
modules below are first imported; set it yourself (``0`` or ``1``) before that to choose.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# imported after choosing: @triton.jit reads TRITON_INTERPRET
from sptutor.kernels._tiles import INTERPRETED, TileConfig
from sptutor.kernels.flash_attention import (
    flash_attention_backward,
    flash_attention_forward,
)
from sptutor.kernels.linear_attention import (
    linear_attention_backward,
    linear_attention_forward,
)

__all__ = [
    "INTERPRETED",
    "TileConfig",
    "flash_attention_backward",
    "flash_attention_forward",
    "linear_attention_backward",
    "linear_attention_forward",
]
