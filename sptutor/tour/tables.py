"""The tour's tables: rows folded into the short tables it prints, and plain-text formatting."""

from __future__ import annotations

from sptutor import layout


def _largest(*columns: str):
    """Reducer: the largest value of ``columns`` in a group ("-" marks one that does not apply)."""
    return lambda group: max(row[c] for row in group for c in columns if row[c] != "-")


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
    reducers = {"cases": len, "out err": _largest("out err"), "lse err": _largest("lse err")}
    return summarize(rows, ("layout",), reducers)


def oracle_table(rows: list[dict]) -> list[dict]:
    """Section 2 as printed: one row per method and causal, each layout's work balance beside
    (bytes do not depend on the layout: "= formula" holds them to sptutor.cost, which has none)."""
    reducers = {
        "err": _largest("out err", "lse err", "grad err"),
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
        "err": _largest("out err", "lse err", "grad err"),
        "ledger": lambda group: "match" if {r["ledger"] for r in group} == {"match"} else "DIFFERS",
        "saved B": _largest("saved B/rank"),
        "= oracle": lambda group: all(row["= oracle"] for row in group),
    }
    return summarize(rows, ("method",), reducers)
