"""``sptutor tour``: the facts every sequence-parallel method rests on, measured and printed.

Each section prints a table whose rows later issues extend (one row per method, oracle and real).
"""

from __future__ import annotations

import itertools

import torch

from sptutor import blocks, layout
from sptutor.oracle import reference
from sptutor.testing import relative_error


def random_qkv(
    batch: int, seq_len: int, heads_q: int, heads_kv: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 q: (B, S, Hq, D) and k, v: (B, S, Hkv, D) from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads_q, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, seq_len, heads_kv, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, seq_len, heads_kv, head_dim, generator=generator, dtype=torch.float64)
    return q, k, v


def merge_rows(seq_len: int = 48) -> list[dict]:
    """Attention over all keys == the LSE-merge of attention over each rank's block of keys."""
    q, k, v = random_qkv(2, seq_len, 4, 2, 16)
    scale = 16**-0.5
    all_pos = torch.arange(seq_len)
    rows = []
    for lay, world, causal in itertools.product(layout.LAYOUTS, (2, 4, 8), (False, True)):
        expected_out, expected_lse = reference.full_attention(q, k, v, causal=causal)
        out = lse = None
        for rank in range(world):
            k_pos = layout.positions(seq_len, world=world, rank=rank, layout=lay)
            part = blocks.attention_block(
                q, k[:, k_pos], v[:, k_pos], all_pos, k_pos, causal, scale
            )
            out, lse = part if out is None else blocks.merge(out, lse, *part)
        rows.append(
            {
                "layout": lay,
                "W": world,
                "causal": causal,
                "out err": relative_error(out, expected_out),
                "lse err": relative_error(lse, expected_lse),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table (floats in scientific notation)."""
    columns = list(rows[0])
    cells = [
        [f"{row[c]:.1e}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def run() -> None:
    """Print every section of the tour."""
    print("1. Blocks of keys merged by their log-sum-exp equal attention over all keys")
    print("   (float64; each rank's keys under a layout, merged in rank order; errors relative)\n")
    print(format_table(merge_rows()))
