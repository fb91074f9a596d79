"""``sptutor bench packed``: one packed batch, each method's useful work and bytes per rank.

Seven documents of different lengths packed into one sequence of S = 1000 tokens, over W = 4
ranks, causal (softmax methods zigzag, the linear ones contiguous, the only layout they take).
Per rank, from the oracle's ledger (forward + backward): the useful multiply-adds (the compute
events: pairs inside one document, the causal half of them), next to the same sequence as one
document; how many blocks were computed for one document but skipped here, because no pair in
them shares a document; and the bytes sent, beside ``sptutor.cost``'s closed form. Documents
change the balance of work, never the bytes: messages travel on the fixed schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sptutor import console, cost, oracle
from sptutor.bench import common

DOCUMENTS = (40, 310, 95, 180, 12, 263, 100)  # lengths: one short, one long, one crossing ranks
SHAPE = cost.Shape(batch=1, seq_len=sum(DOCUMENTS), heads_q=4, heads_kv=2, head_dim=8,
                   dtype=torch.float32)  # fmt: skip
WORLD = 4
METHODS = ("ring", "rsa", "ulysses", "usp", "lss", "lasp", "lasp2")


def cu_seqlens() -> torch.Tensor:
    """The batch's (N+1,) offsets: 0, then the running sum of DOCUMENTS."""
    return torch.tensor([0, *torch.tensor(DOCUMENTS).cumsum(0).tolist()])


def layout_of(method: str) -> str:
    """zigzag for the softmax methods (it balances causal work), contiguous for LASP's."""
    return "contiguous" if method in ("lasp", "lasp2") else "zigzag"


def rows(methods: tuple[str, ...] = METHODS) -> list[dict]:
    """One row per method and rank: ``macs`` (useful, both phases), ``macs_one_document`` (the
    same sequence as one document), ``skipped`` (block pairs with no visible pair, both
    phases), ``sent`` (ledger bytes) and ``cost_sent`` (closed form)."""
    found = []
    for method in methods:
        degree = common.ulysses_degree(method, WORLD)
        options = dict(world=WORLD, causal=True, layout=layout_of(method), ulysses=degree)
        q, k, v, dout = common.inputs(SHAPE)
        packed = oracle.simulate(method, q, k, v, dout, cu_seqlens=cu_seqlens(), **options)
        whole = oracle.simulate(method, q, k, v, dout, **options)
        closed = cost.of(method, SHAPE, WORLD, causal=True, ulysses=degree,
                         layout=options["layout"])  # fmt: skip
        for rank in range(WORLD):
            blocks = [e for e in packed.ledger.events if e.op == "compute" and e.rank == rank]
            unpacked = [e for e in whole.ledger.events if e.op == "compute" and e.rank == rank]
            found.append({
                "method": method, "layout": options["layout"], "rank": rank,
                "macs": packed.ledger.macs(rank), "macs_one_document": whole.ledger.macs(rank),
                "skipped": len(unpacked) - len(blocks), "sent": packed.ledger.bytes_sent(rank),
                "cost_sent": closed.forward[rank] + closed.backward[rank],
                "sent_one_document": whole.ledger.bytes_sent(rank),
            })  # fmt: skip
    return found


def balance(measured: list[dict], key: str = "macs") -> dict[str, float]:
    """Per method: the busiest rank's ``key`` over the idlest's (1.0 = balanced)."""
    per_method: dict[str, list[int]] = {}
    for row in measured:
        per_method.setdefault(row["method"], []).append(row[key])
    return {method: max(v) / min(v) for method, v in per_method.items()}


def run(out: Path | None = None, quick: bool = False) -> int:
    """Print the table; with ``out``, write packed.json. ``quick``: ring and lasp only."""
    measured = rows(("ring", "lasp") if quick else METHODS)
    console.say(f"{len(DOCUMENTS)} documents {list(DOCUMENTS)} packed into S={SHAPE.seq_len}, "
                f"W={WORLD}, causal, {common.describe(SHAPE)}; usp U=2")  # fmt: skip
    packed, whole = balance(measured), balance(measured, "macs_one_document")
    console.table(
        [(r["method"], r["layout"], r["rank"], r["macs"], r["macs_one_document"], r["skipped"],
          r["sent"], r["cost_sent"], "yes" if r["sent"] == r["cost_sent"] else "NO")
         for r in measured],
        ("method", "layout", "rank", "MACs packed", "MACs 1 doc", "skipped", "bytes sent",
         "closed form", "equal"),
        notes=("MACs: useful multiply-adds, forward + backward; '1 doc': the same S as one "
               "document. skipped: blocks computed for one document, skipped here (no pair in "
               "them shares a document).",
               "bytes sent: the oracle's ledger, forward + backward, the same as for one document "
               "(fixed schedule)."),
    )  # fmt: skip
    console.table(
        [(m, f"{packed[m]:.3f}", f"{whole[m]:.3f}") for m in packed],
        ("method", "max/min MACs packed", "max/min MACs 1 doc"),
        notes=("max/min: the busiest rank's useful work over the idlest's; 1.000 = balanced.",),
    )  # fmt: skip
    figures = {"what": "packed", "documents": list(DOCUMENTS), "world": WORLD,
               "shape": {**common.shape_dict(SHAPE), "seq_len": SHAPE.seq_len},
               "balance": packed, "balance_one_document": whole, "rows": measured}  # fmt: skip
    common.write(out, "packed", figures, lambda: draw(measured))
    exact = all(r["sent"] == r["cost_sent"] == r["sent_one_document"] for r in measured)
    return 0 if exact else 1


def draw(measured: list[dict]):
    """``plots.balance`` of the packed batch above the same S as one document, one group of
    bars per method."""
    from matplotlib.figure import Figure

    from sptutor import plots

    figure = Figure(figsize=(11, 8.4), layout="constrained")
    for key, ax, what in zip(("macs", "macs_one_document"), figure.subplots(2, 1),
                             (f"{len(DOCUMENTS)} packed documents", "one document")):  # fmt: skip
        plots.balance([{"layout": r["method"], "rank": r["rank"], "macs": r[key]}
                       for r in measured], ax=ax)  # fmt: skip
        ax.set_title(f"{what}, S = {SHAPE.seq_len}, W = {WORLD}, causal")
    return figure
