"""What the oracle benchmarks (comm, memory, balance) share: seeded inputs, one measured
simulation as a row, and writing ``<what>.json`` and ``<what>.png`` under ``--out``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from sptutor import console, cost, oracle


def inputs(shape: cost.Shape, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded full inputs: q, dout: (B, S, Hq, D); k, v: (B, S, Hkv, D) in ``shape.dtype``."""
    generator = torch.Generator().manual_seed(seed)
    sizes_q = (shape.batch, shape.seq_len, shape.heads_q, shape.head_dim)
    sizes_kv = (shape.batch, shape.seq_len, shape.heads_kv, shape.head_dim)
    q, dout = (torch.randn(sizes_q, generator=generator, dtype=shape.dtype) for _ in range(2))
    k, v = (torch.randn(sizes_kv, generator=generator, dtype=shape.dtype) for _ in range(2))
    return q, k, v, dout


def ulysses_degree(method: str, world: int) -> int | None:
    """U of the benchmarks' usp: 2 on an even W, else 1; None for the other methods."""
    if method != "usp":
        return None
    return 2 if world % 2 == 0 else 1


def measure(method: str, shape: cost.Shape, world: int, *, causal: bool = True) -> dict:
    """One causal forward + backward simulated on ``world`` ranks, and ``sptutor.cost`` beside.

    Returns a row: method, world, seq_len; per rank ``forward``, ``backward`` (bytes sent,
    from the ledger) and ``saved`` (``saved_bytes``); ``sent`` = max over ranks of forward +
    backward, ``saved`` max over ranks; ``cost_sent``, ``cost_saved`` the same from the closed
    forms; ``macs`` per rank (compute events, both phases).
    """
    degree = ulysses_degree(method, world)
    q, k, v, dout = inputs(shape)
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal, ulysses=degree)
    closed = cost.of(method, shape, world, causal=causal, ulysses=degree)
    forward = [sim.ledger.bytes_sent(r, "forward") for r in range(world)]
    backward = [sim.ledger.bytes_sent(r, "backward") for r in range(world)]
    saved = [record.saved_bytes for record in sim.ranks]
    return {
        "method": method, "world": world, "seq_len": shape.seq_len, "ulysses": degree,
        "forward": forward, "backward": backward,
        "sent": max(f + b for f, b in zip(forward, backward)),
        "cost_sent": max(f + b for f, b in zip(closed.forward, closed.backward)),
        "saved_per_rank": saved, "saved": max(saved), "cost_saved": max(closed.saved),
        "macs": [sim.ledger.macs(r) for r in range(world)],
    }  # fmt: skip


def describe(shape: cost.Shape) -> str:
    """``B=1 Hq=8 Hkv=8 D=8 float32``."""
    dtype = str(shape.dtype).removeprefix("torch.")
    return f"B={shape.batch} Hq={shape.heads_q} Hkv={shape.heads_kv} D={shape.head_dim} {dtype}"


def shape_dict(shape: cost.Shape) -> dict:
    """The shape for the JSON file (S varies per row, so it is left out)."""
    dtype = str(shape.dtype).removeprefix("torch.")
    return {"batch": shape.batch, "heads_q": shape.heads_q, "heads_kv": shape.heads_kv,
            "head_dim": shape.head_dim, "dtype": dtype}  # fmt: skip


def write(out: Path | None, what: str, figures: dict, draw: Callable) -> list[Path]:
    """Write ``figures`` to ``out/<what>.json`` and ``draw()``'s figure to ``out/<what>.png``
    (``out`` is created); nothing when ``out`` is None. Returns the paths written."""
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    data, picture = out / f"{what}.json", out / f"{what}.png"
    data.write_text(json.dumps(figures, indent=1) + "\n")
    console.save_figure(draw, picture)
    console.say(f"wrote {data} and {picture}", style="green")
    return [data, picture]
