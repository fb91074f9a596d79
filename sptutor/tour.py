"""``sptutor tour``: the facts every sequence-parallel method rests on, measured and printed.

Each section prints a table whose rows later issues extend (one row per method, oracle and real).
"""

from __future__ import annotations

import itertools
import sys
import textwrap
import time

import torch

from sptutor import blocks, cost, launch, layout, oracle
from sptutor.mesh import make_usp_mesh
from sptutor.oracle import reference
from sptutor.testing import Case, compare_with_oracle, relative_error, run_case

# (method, options) rows of the oracle section; each method appears with every layout it supports
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


def _worst(*columns: str):
    """Reducer: the largest error in ``columns`` ("-" marks one that does not apply)."""
    return lambda group: max(row[c] for row in group for c in columns if row[c] != "-")


def _largest(column: str):
    """Reducer: the largest value of ``column``."""
    return lambda group: max(row[column] for row in group)


def summarize(rows: list[dict], by: tuple[str, ...], reducers: dict) -> list[dict]:
    """One row per distinct value of the ``by`` columns, in order of first appearance; every
    other column is ``reducers[name](rows of that group)``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in by), []).append(row)
    return [
        dict(zip(by, key)) | {name: reduce(group) for name, reduce in reducers.items()}
        for key, group in groups.items()
    ]


def merge_table(rows: list[dict]) -> list[dict]:
    """Section 1 as printed: one row per layout, the worst error over its W x causal cases."""
    reducers = {"cases": len, "out err": _worst("out err"), "lse err": _worst("lse err")}
    return summarize(rows, ("layout",), reducers)


def oracle_table(rows: list[dict]) -> list[dict]:
    """Section 2 as printed: one row per method and causal, each layout's work balance beside
    (bytes do not depend on the layout: "= formula" holds them to sptutor.cost, which has none)."""
    reducers = {
        "err": _worst("out err", "lse err", "grad err"),
        "fwd B": _largest("fwd B/rank"),
        "bwd B": _largest("bwd B/rank"),
        "saved B": _largest("saved B/rank"),
        "= formula": lambda group: all(row["= formula"] for row in group),
    }
    for lay in layout.LAYOUTS:
        reducers[lay] = lambda group, lay=lay: next(
            (row["work max/min"] for row in group if row["layout"] == lay), "-"
        )
    return summarize(rows, ("method", "causal"), reducers)


def real_table(rows: list[dict]) -> list[dict]:
    """Section 3 as printed: one row per method, the worst over its layout x causal runs."""
    reducers = {
        "runs": len,
        "err": _worst("out err", "lse err", "grad err"),
        "ledger": lambda group: "match" if {r["ledger"] for r in group} == {"match"} else "DIFFERS",
        "saved B": _largest("saved B/rank"),
        "= oracle": lambda group: all(row["= oracle"] for row in group),
    }
    return summarize(rows, ("method",), reducers)


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table under a dashed rule (floats as 1.0e-16)."""
    columns = list(rows[0])
    cells = [
        [f"{row[c]:.1e}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        for row in rows
    ]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


OPENING = """\
sptutor tour: sequence parallelism for attention, measured

sptutor teaches sequence parallelism: how long-context training splits one sequence over W
processes ("ranks"), each holding S/W of its tokens. Seven methods are each written twice, as a
single-process oracle that emulates all W ranks and as real torch.distributed code: rsa, ring,
ulysses, usp (Ulysses inside a ring) and lss for softmax attention, lasp and lasp2 for linear
attention. On small float64 inputs the tour checks that each method is exact, counts the bytes
it sends and keeps for backward and how evenly it shares the work, then prices it at a realistic
size. Four sections, about 10 seconds on a CPU; no GPU needed."""

ERR = "relative error ‖a−b‖/‖b‖"
# number: (title, two lines of what the section shows and why it matters, legend of its columns)
SECTIONS = {
    1: ("Splitting the keys over ranks loses nothing",
        ("Each rank attends to its own block of keys; merging the partial outputs by their",
         "log-sum-exp (LSE) gives full attention back exactly. The softmax methods rest on it."),
        [("layout", "which tokens a rank holds: contiguous = one block of S/W, zigzag = chunks "
          "r and 2W-1-r of 2W (balances causal work), striped = tokens r, r+W, r+2W, ..."),
         ("cases", "merges per layout: W = 2, 4, 8 ranks, causal and not (B=2, S=48, Hq=4, "
          "Hkv=2, D=16, float64)"),
         ("out err, lse err", f"largest {ERR} of the merged output and LSE against full "
          "attention, over the cases; float64 rounding is about 1e-16")]),
    2: ("Each method's oracle is exact, and what it sends is a formula",
        ("The oracle emulates W=4 ranks in one process and logs every message in a ledger. It",
         "must equal full attention, and its bytes the closed forms that section 4 prices."),
        [("method", "usp u=2 = Ulysses over 2 ranks inside a ring of 2 (inputs: B=1, S=32, "
          "Hq=4, Hkv=2, D=16, float64)"),
         ("causal", "True = each token sees only earlier ones (lasp, lasp2 also decay per head)"),
         ("err", f"largest {ERR} of out, LSE, dq, dk, dv against full attention and autograd, "
          "over the layouts"),
         ("fwd B, bwd B, saved B", "bytes (B) the busiest rank sends in forward, sends in "
          "backward, keeps for backward; the same under every layout"),
         ("= formula", "True when every rank's sent and kept bytes equal the closed form of "
          "sptutor.cost exactly, under every layout"),
         ("contiguous, zigzag, striped", "work max/min under that layout: useful multiply-adds "
          "of the busiest rank over the idlest, 1.00 = balanced; - = not run (linear methods "
          "are contiguous only)")]),
    3: (f"The real code on {REAL_WORLD} processes equals its oracle",
        ("The same methods as real torch.distributed code, against the oracle on the same inputs:",
         "outputs, gradients, every message, every byte kept. sptutor.testing does it for yours."),
        [("method", "as in section 2; usp runs on a 2 x 2 mesh of the 4 processes"),
         ("runs", "layout x causal cases, all in one launch (B=1, S=32, Hq=4, Hkv=2, D=16, "
          "float64)"),
         ("err", f"largest {ERR} of out, LSE, dq, dk, dv against the oracle, over ranks and "
          "runs"),
         ("ledger", "match = every rank sent exactly the oracle's messages, in order "
          "(operation, peer, bytes, phase, step)"),
         ("saved B", "bytes (B) autograd keeps for backward on the busiest rank, as seen by "
          "saved-tensor hooks"),
         ("= oracle", "True when every rank keeps exactly the bytes the oracle counts")]),
    4: ("At a realistic size: what a rank sends and keeps",
        ("The closed forms checked above, for a Llama-3-8B-like attention layer: RSA keeps S²/W",
         "scores, LSS all of K and V, ring/Ulysses/USP O(S/W) bytes; LASP sends D×D states only."),
        [("method", "u = the Ulysses degree of the USP mesh, W/2"),
         ("S, W", "sequence length in tokens, ranks (B=1, Hq=32, Hkv=8, D=128, bfloat16, "
          "causal)"),
         ("sent MiB/rank", "bytes sent forward + backward, each by that phase's busiest rank, "
          "in MiB (2^20 bytes)"),
         ("saved MiB/rank", "bytes the busiest rank keeps for backward, in MiB")]),
}  # fmt: skip

CLOSING = """\
Where to go next
   mkdocs serve        the docs site, from the repository root: start with the pages Concepts,
                       Design, and Oracle and real code side by side
   sptutor train --method ring --world 4
                       train a tiny GPT with ring attention on 4 CPU processes; every option
                       (methods, layouts, sizes) is in 'sptutor train --help'
   sptutor bench lasp  time LASP's torch backend on this CPU
   sptutor.testing     check your own attention code against the oracle: the README section
                       "Point the oracle at your own code" has the whole script"""


def _heading(number: int) -> None:
    """A section's title and its two lines of what it shows and why that matters."""
    title, intro, _ = SECTIONS[number]
    print(f"\n{number}. {title}\n" + "".join(f"   {line}\n" for line in intro), flush=True)


def _table(number: int, rows: list[dict]) -> None:
    """The table, then its legend: one "names: meaning" entry per column, wrapped to 96."""
    print(format_table(rows) + "\n")
    for names, meaning in SECTIONS[number][2]:
        print(textwrap.fill(f"{names}: {meaning}", 96, initial_indent="   ",
                            subsequent_indent="     ", break_on_hyphens=False))  # fmt: skip
    sys.stdout.flush()


def run() -> None:
    """Print the tour: an opening, four measured sections with legends, where to go next."""
    started = time.perf_counter()
    print(OPENING)
    _heading(1)
    _table(1, merge_table(merge_rows()))
    _heading(2)
    _table(2, oracle_table(oracle_rows()))
    _heading(3)
    print(f"   starting {REAL_WORLD} gloo processes (a few seconds)...", flush=True)
    launched = time.perf_counter()
    rows = real_rows()
    print(f"   done in {time.perf_counter() - launched:.1f} s\n", flush=True)
    _table(3, real_table(rows))
    _heading(4)
    _table(4, cost_rows())
    print(f"\n{CLOSING}\n\nThe tour took {time.perf_counter() - started:.1f} s.")
