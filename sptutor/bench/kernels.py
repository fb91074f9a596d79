"""``sptutor bench kernels``: time the Triton kernels against PyTorch's fused attention on a GPU.

A benchmark, not a test: it prints a table and checks nothing. For each case (B, Hq, Hkv, S, D,
causal) it times :func:`sptutor.kernels.flash_attention_forward` and
:func:`~sptutor.kernels.flash_attention_backward` against
``torch.nn.functional.scaled_dot_product_attention`` pinned to its flash backend (FlashAttention-2)
in the same dtype (SDPA's own choice where flash refuses the case, e.g. float32), and prints
TFLOP/s and the ratio ours / SDPA.

FLOPs count the useful work only: ``4·B·Hq·S²·D`` forward (two matmuls of 2 FLOPs per
multiply-add), half of it causal, and 2.5 times that backward (five matmuls instead of two).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    causal: bool

    def flops(self, backward: bool = False) -> float:
        """Useful FLOPs of one call (forward, or backward = 2.5 x forward)."""
        forward = 4 * self.batch * self.heads_q * self.seq_len**2 * self.head_dim
        forward /= 2 if self.causal else 1
        return 2.5 * forward if backward else forward

    def __str__(self) -> str:
        kind = "causal" if self.causal else "full"
        return (f"B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} S={self.seq_len} "
                f"D={self.head_dim} {kind}")  # fmt: skip


def cases(quick: bool = False) -> list[Case]:
    """Typical LLM shapes: D 64 and 128, S from 4k to 32k (16k tokens a batch, 2048 model
    width), MHA and GQA, causal and not."""
    seqs = (4096, 16384) if quick else (4096, 16384, 32768)
    found = []
    for head_dim in (64, 128):
        for seq_len in seqs:
            for causal in (False, True):
                batch = max(1, 16384 // seq_len)
                found.append(
                    Case(batch, 2048 // head_dim, 2048 // head_dim, seq_len, head_dim, causal)
                )
    found.append(Case(1, 32, 8, 8192, 128, True))  # GQA, Llama-3-8B-like
    return found


def _milliseconds(fn) -> float:
    """Median time of ``fn()`` in ms (Triton's do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@dataclasses.dataclass(frozen=True)
class Timing:
    """ms of one case: ours and SDPA's forward and backward, and which SDPA backend ran."""

    ours_fwd: float
    sdpa_fwd: float
    ours_bwd: float
    sdpa_bwd: float
    sdpa: str

    def tflops(self, case: Case) -> tuple[float, float, float, float]:
        """TFLOP/s of useful work: ours fwd, SDPA fwd, ours bwd, SDPA bwd."""
        fwd, bwd = case.flops() / 1e9, case.flops(backward=True) / 1e9  # GFLOP / ms = TFLOP/s
        return fwd / self.ours_fwd, fwd / self.sdpa_fwd, bwd / self.ours_bwd, bwd / self.sdpa_bwd


def _sdpa_backend(sdpa, q, k, v, options) -> str:
    """Which SDPA backend the case gets: "flash" when its flash backend takes it, else
    "default" (SDPA's own choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(q, k, v, **options)
    except RuntimeError:
        return "default"
    return "flash"


def time_case(case: Case, dtype: torch.dtype) -> Timing:
    """Times of ours and SDPA's (flash backend where it takes the case) forward and backward."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sptutor import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (case.batch, case.seq_len, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seq_len, case.heads_kv, case.head_dim)
    q, dout = (torch.randn(shape_q, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    options = dict(causal=case.causal)
    out, lse = kernels.flash_attention_forward(q, k, v, **options)
    ours_fwd = _milliseconds(lambda: kernels.flash_attention_forward(q, k, v, **options))
    ours_bwd = _milliseconds(
        lambda: kernels.flash_attention_backward(dout, q, k, v, out, lse, **options)
    )
    # SDPA wants (B, H, S, D) and repeated K/V heads unless told enable_gqa
    q_t, k_t, v_t = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = dict(is_causal=case.causal, enable_gqa=case.heads_q != case.heads_kv)
    backend = _sdpa_backend(sdpa, q_t, k_t, v_t, gqa)

    def pinned():
        if backend == "flash":
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        return contextlib.nullcontext()

    def sdpa_forward():
        with pinned():
            return sdpa(q_t, k_t, v_t, **gqa)

    sdpa_fwd = _milliseconds(sdpa_forward)
    sdpa_out = sdpa_forward()
    dout_t = dout.transpose(1, 2)
    sdpa_bwd = _milliseconds(lambda: sdpa_out.backward(dout_t, retain_graph=True))
    return Timing(ours_fwd, sdpa_fwd, ours_bwd, sdpa_bwd, backend)


def run_kernels(dtype: str = "bfloat16", quick: bool = False) -> int:
    """Print the table on a CUDA GPU; on a CPU machine say there is none. Returns the exit code."""
    if not torch.cuda.is_available():
        print(
            "sptutor bench kernels: no CUDA GPU here, nothing to time. On a CPU the kernels run "
            "under the Triton interpreter (numpy, for tests), which says nothing about speed."
        )
        return 0
    torch_dtype = getattr(torch, dtype)
    print(f"{torch.cuda.get_device_name()}, {dtype}; TFLOP/s of useful work, ratio = ours / SDPA")
    print(f"{'case':<48} {'fwd':>7} {'sdpa':>7} {'ratio':>6} {'bwd':>7} {'sdpa':>7} {'ratio':>6}"
          "  sdpa backend")  # fmt: skip
    for case in cases(quick):
        timing = time_case(case, torch_dtype)
        ours_fwd, sdpa_fwd, ours_bwd, sdpa_bwd = timing.tflops(case)
        print(
            f"{case!s:<48} {ours_fwd:7.1f} {sdpa_fwd:7.1f} {ours_fwd / sdpa_fwd:6.2f} "
            f"{ours_bwd:7.1f} {sdpa_bwd:7.1f} {ours_bwd / sdpa_bwd:6.2f}  {timing.sdpa}"
        )
    return 0
