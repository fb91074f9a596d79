"""``sptutor bench lasp``: one LASP rank's forward and backward on the ``"torch"`` backend.

It times them on CPU at C = 4096, 16384 and 65536 and prints µs per token, flat in C: the
intra-chunk part runs in sub-chunks and the state is D×D.
"""

from __future__ import annotations

import time

import torch


def _lasp_rank_seconds(chunk: int, shape: tuple[int, int, int, int], repeats: int) -> float:
    """Best time in s of one LASP rank's work (torch backend, a neighbour on each side):
    local forward, carry and readout; local backward, carry and the state's dk, dv."""
    from sptutor import backends, chunks

    batch, heads_q, heads_kv, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(batch, chunk, heads_q, head_dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(batch, chunk, heads_kv, head_dim, generator=gen) for _ in range(2))
    kv_in, dkv_out = (torch.randn(batch, heads_q, head_dim, head_dim) for _ in range(2))
    decay = torch.linspace(0.99, 0.999, heads_q)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out, local = backends.linear_local_forward("torch", q, k, v, decay, True)
        chunks.carry(kv_in, local, decay, chunk)
        out = out + chunks.readout(q, kv_in, decay)
        *_, local_dstate = backends.linear_local_backward(
            "torch", dout, q, k, v, kv_in, decay, True
        )
        chunks.carry(dkv_out, local_dstate, decay, chunk)
        chunks.local_state_backward(dkv_out, k, v, decay)
        best = min(best, time.perf_counter() - start)
    return best


def run_lasp(quick: bool = False) -> int:
    """Print one LASP rank's time per token at growing C on CPU: flat, since the intra part runs
    in sub-chunks and the state is D×D. Returns the exit code."""
    shape = (1, 4, 2, 64)  # B, Hq, Hkv, D
    chunks = (4096, 16384) if quick else (4096, 16384, 65536)
    print(
        f"LASP, one rank's forward + backward on the torch backend: CPU float32, "
        f"B={shape[0]} Hq={shape[1]} Hkv={shape[2]} D={shape[3]}, per-head decay, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'C':>6} {'ms':>9} {'µs/token':>9}")
    _lasp_rank_seconds(256, shape, repeats=1)  # warm-up
    for chunk in chunks:
        repeats = 1 if quick else max(2, 16384 // chunk)  # best of a few: the CPU may be shared
        seconds = _lasp_rank_seconds(chunk, shape, repeats)
        print(f"{chunk:>6} {seconds * 1e3:9.1f} {seconds / chunk * 1e6:9.2f}")
    return 0
