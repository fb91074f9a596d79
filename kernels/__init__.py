"""Triton kernels for block attention (imported as ``sptutor.kernels``).

- :func:`flash_attention_forward`, :func:`flash_attention_backward`: FlashAttention-2 with masks
  from global positions and (packed documents) per-token document ids, the contract of
  ``sptutor.blocks.attention_block`` and its backward.
- :func:`linear_attention_forward`, :func:`linear_attention_backward`: chunked causal (or
  non-causal) linear attention with a per-head decay and an incoming state (see Design,
  *Linear attention*).
- ``TileConfig``: tile sizes and launch parameters, to tune on a GPU (``config=``).

On a machine without CUDA, importing this package sets ``TRITON_INTERPRET=1`` if the variable is
unset, so the kernels run on CPU tensors under the Triton interpreter (slow, for tests and
reading). Triton reads the variable when ``@triton.jit`` decorates a kernel, so it cannot be
chosen per call: it holds for the **whole process**, and any other Triton code imported after
this package is interpreted too. A warning says so once, when this package sets it. Set the
variable yourself (``0`` or ``1``) before importing to choose; it is then left alone.
"""

import os
import warnings

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    warnings.warn(
        "sptutor.kernels found no CUDA GPU and set TRITON_INTERPRET=1 for this whole process: "
        "every Triton kernel decorated from now on, not only sptutor's, runs under the slow "
        "interpreter. Set TRITON_INTERPRET before importing sptutor.kernels to choose.",
        stacklevel=2,
    )

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
