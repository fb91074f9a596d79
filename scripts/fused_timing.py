"""Time the fused CPU backend (sptutor.fused) against torch SDPA and the readable block math.

One process, one thread, float32, causal, B = 1, Hq = Hkv: the median of ``--repeats`` runs
after a warm-up. Rows: forward, and forward + backward, of

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on (B, H, S, D)
  (backward by autograd);
- ``fused``: ``sptutor.fused.attention_forward`` / ``attention_backward`` on the whole sequence;
- ``blocks``: ``sptutor.blocks.attention_block`` / ``attention_block_backward`` (the oracle's);
- ``fused zigzag W=4``: the sum over the W² (rank, src) blocks a zigzag ring computes (each
  block's forward, and its backward from the rank's final out and LSE).

Not a test: ``python scripts/fused_timing.py [--seq 4096] [--heads 8] [--dim 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sptutor import blocks, fused, layout


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdpa_rows(q, k, v, dout, repeats):
    """(forward, forward + backward) seconds of SDPA on (B, H, S, D) views of (B, S, H, D)."""
    heads = [x.transpose(1, 2) for x in (q, k, v)]
    attend = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            attend(*heads, is_causal=True)

    def both():
        leaves = [x.detach().requires_grad_() for x in heads]
        attend(*leaves, is_causal=True).backward(dout.transpose(1, 2))

    return median_seconds(forward, repeats), median_seconds(both, repeats)


def block_rows(module_forward, module_backward, q, k, v, dout, repeats):
    """(forward, forward + backward) seconds of one block over the whole causal sequence."""
    pos = torch.arange(q.shape[1])
    scale = q.shape[-1] ** -0.5

    def forward():
        return module_forward(q, k, v, pos, pos, True, scale)

    def both():
        out, lse = forward()
        module_backward(dout, q, k, v, out, lse, pos, pos, True, scale)

    return median_seconds(forward, repeats), median_seconds(both, repeats)


def one_block(q, k, v, dout, out, lse, q_pos, k_pos, repeats):
    """(forward, forward + backward) seconds of one fused block (backward from final out, lse)."""
    scale = q.shape[-1] ** -0.5

    def forward():
        fused.attention_forward(q, k, v, q_pos, k_pos, True, scale)

    def both():
        forward()
        fused.attention_backward(dout, q, k, v, out, lse, q_pos, k_pos, True, scale)

    return median_seconds(forward, repeats), median_seconds(both, repeats)


def zigzag_rows(q, k, v, dout, world, repeats):
    """(forward, forward + backward) seconds summed over a zigzag ring's W² blocks (fused)."""
    cut = layout.all_positions(q.shape[1], world=world, layout="zigzag")
    scale = q.shape[-1] ** -0.5
    forward_total = both_total = 0.0
    for mine in cut:
        q_r, dout_r = q[:, mine], dout[:, mine]
        parts = [fused.attention_forward(q_r, k[:, src], v[:, src], mine, src, True, scale)
                 for src in cut]  # fmt: skip
        out, lse = parts[0]
        for part in parts[1:]:  # the rank's final out and LSE, for the backward
            out, lse = blocks.merge(out, lse, *part)
        for src in cut:
            forward, both = one_block(q_r, k[:, src], v[:, src], dout_r, out, lse, mine, src,
                                      repeats)  # fmt: skip
            forward_total, both_total = forward_total + forward, both_total + both
    return forward_total, both_total


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-blocks", action="store_true", help="leave out the slow block math")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.seq, args.heads, args.dim)
    q, k, v, dout = (torch.randn(shape, generator=generator) for _ in range(4))
    rows = {"sdpa (is_causal)": sdpa_rows(q, k, v, dout, args.repeats)}
    rows["fused"] = block_rows(fused.attention_forward, fused.attention_backward, q, k, v, dout,
                               args.repeats)  # fmt: skip
    if not args.skip_blocks:
        rows["blocks"] = block_rows(blocks.attention_block, blocks.attention_block_backward, q,
                                    k, v, dout, args.repeats)  # fmt: skip
    rows[f"fused zigzag W={args.world} (sum of blocks)"] = zigzag_rows(q, k, v, dout, args.world,
                                                                       args.repeats)  # fmt: skip
    print(f"S={args.seq} Hq=Hkv={args.heads} D={args.dim} float32 causal, 1 thread, "
          f"median of {args.repeats} after a warm-up")  # fmt: skip
    print(f"{'':36} {'forward s':>10} {'fwd+bwd s':>10} {'fwd vs sdpa':>12} {'f+b vs sdpa':>12}")
    base_forward, base_both = rows["sdpa (is_causal)"]
    for name, (forward, both) in rows.items():
        print(f"{name:36} {forward:10.3f} {both:10.3f} {forward / base_forward:11.2f}x "
              f"{both / base_both:11.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
