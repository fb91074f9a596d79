"""The tour's measurements: one row per case, each a fact the tests hold to its claim."""

from __future__ import annotations

import itertools

import torch

from sptutor import blocks, cost, launch, layout, oracle
from sptutor.mesh import make_usp_mesh
from sptutor.oracle import reference
from sptutor.testing import Case, compare_with_oracle, relative_error, run_case

ORACLE_ROWS = [
    ("rsa", {}),
    ("ring", {}),
    ("ulysses", {}),
    ("usp", {"ulysses": 2}),
    ("lss", {}),
    ("lasp", {}),
    ("lasp2", {}),
]
DECAY = torch.tensor([0.9, 0.95, 0.99, 1.0], dtype=torch.float64)  # per head, causal linear rows
REAL_WORLD = 4  # processes of section 3


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


def _reference_with_grads(method, q, k, v, dout, causal, decay):
    """Ground truth out, lse (None for linear methods) and autograd dq, dk, dv."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    if method in oracle.LINEAR_METHODS:
        out, lse = reference.full_linear_attention(q, k, v, causal=causal, decay=decay), None
    else:
        out, lse = reference.full_attention(q, k, v, causal=causal)
    out.backward(dout)
    return out, lse, q.grad, k.grad, v.grad


def oracle_row(method: str, lay: str, causal: bool, world: int = 4, **options) -> dict:
    """One method on the emulated world vs the ground truth, with its ledger against the formula."""
    q, k, v = random_qkv(1, 32, 4, 2, 16, seed=1)
    dout = random_qkv(1, 32, 4, 4, 16, seed=2)[0]
    sim = oracle.simulate(method, q, k, v, dout, world=world, causal=causal, layout=lay, **options)
    out, lse, dq, dk, dv = _reference_with_grads(
        method, q, k, v, dout, causal, options.get("decay")
    )
    expected = cost.of(
        method, cost.Shape.of(q, k), world, causal=causal, ulysses=options.get("ulysses")
    )
    measured = cost.Cost(
        tuple(sim.ledger.bytes_sent(r, "forward") for r in range(world)),
        tuple(sim.ledger.bytes_sent(r, "backward") for r in range(world)),
        tuple(record.saved_bytes for record in sim.ranks),
    )
    work = [sim.ledger.macs(r, "forward") for r in range(world)]
    label = method + "".join(
        f" {key[0]}={value}" for key, value in options.items() if key != "decay"
    )
    return {
        "method": label,
        "layout": lay,
        "causal": causal,
        "out err": relative_error(sim.out, out.detach()),
        "lse err": relative_error(sim.lse, lse.detach()) if lse is not None else "-",
        "grad err": max(
            relative_error(a, b) for a, b in ((sim.dq, dq), (sim.dk, dk), (sim.dv, dv))
        ),
        "fwd B/rank": max(measured.forward),
        "bwd B/rank": max(measured.backward),
        "saved B/rank": max(measured.saved),
        "= formula": measured == expected,
        "work max/min": f"{max(work) / min(work):.2f}" if min(work) else "-",
    }


def configurations():
    """(method, options, layout, causal) of every tour row: linear methods are contiguous only,
    and their causal rows carry a per-head decay."""
    for method, options in ORACLE_ROWS:
        linear = method in oracle.LINEAR_METHODS
        lays = ("contiguous",) if linear else layout.LAYOUTS
        for lay, causal in itertools.product(lays, (False, True)):
            yield method, options | ({"decay": DECAY} if linear and causal else {}), lay, causal


def oracle_rows() -> list[dict]:
    """Every oracle method × layout × causal, W=4, float64."""
    return [
        oracle_row(method, lay, causal, **options)
        for method, options, lay, causal in configurations()
    ]


def _run_real_cases(rank: int, world: int, cases: list[Case]) -> list[dict]:
    """Body of each tour process: every case on the whole world (USP on a 2 x 2 mesh)."""
    mesh = make_usp_mesh(2, world // 2)
    return [run_case(case, None, mesh=mesh) for case in cases]


def real_rows() -> list[dict]:
    """Every real method × layout × causal on 4 gloo processes, compared with its oracle."""
    cases = [
        Case(method, tuple(range(REAL_WORLD)), lay, causal, 1, 32, 4, 2, 16, "float64", seed=3,
             ulysses=options.get("ulysses"), decay=_decay_tuple(options.get("decay")))
        for method, options, lay, causal in configurations()
    ]  # fmt: skip
    results = launch.spawn(_run_real_cases, REAL_WORLD, (cases,))
    rows = []
    for index, case in enumerate(cases):
        per_rank = {rank: results[rank][index] for rank in range(REAL_WORLD)}
        rows.append(_real_row(case, compare_with_oracle(case, per_rank)))
    return rows


def _decay_tuple(decay):
    return None if decay is None else tuple(decay.tolist())


def _real_row(case: Case, comparisons) -> dict:
    """One table row: the worst error over ranks, ledger and saved-bytes agreement."""
    errors = [c.errors for c in comparisons]
    label = case.method + (f" u={case.ulysses}" if case.ulysses else "")
    return {
        "method": label,
        "layout": case.layout,
        "causal": case.causal,
        "out err": max(e["out"] for e in errors),
        "lse err": "-" if case.is_linear else max(e["lse"] for e in errors),
        "grad err": max(e[name] for e in errors for name in ("dq", "dk", "dv")),
        "ledger": "match" if all(c.ledger_match for c in comparisons) else "DIFFERS",
        "saved B/rank": max(c.saved_bytes for c in comparisons),
        "= oracle": all(c.saved_bytes == c.oracle_saved_bytes for c in comparisons),
    }


def cost_rows() -> list[dict]:
    """What one rank sends and keeps at a realistic size, from the closed forms of sptutor.cost
    (sections 2 and 3 check them against the ledgers and saved-tensor hooks exactly)."""
    rows = []
    for seq_len, world in ((32768, 4), (32768, 8), (131072, 8)):
        shape = cost.Shape(1, seq_len, 32, 8, 128, torch.bfloat16)  # Llama-3-8B-like attention
        for method in oracle.METHODS:
            degree = world // 2 if method == "usp" else None
            costs = cost.of(method, shape, world, causal=True, ulysses=degree)
            sent = max(costs.forward) + max(costs.backward)
            label = method + (f" u={degree}" if degree else "")
            rows.append(
                {
                    "method": label,
                    "S": seq_len,
                    "W": world,
                    "sent MiB/rank": f"{sent / 2**20:.1f}",
                    "saved MiB/rank": f"{max(costs.saved) / 2**20:.1f}",
                }
            )
    return rows
