"""Which calls of torch's CPU flash kernel one block needs (``sptutor.fused`` makes them).

A block's queries and keys are cut into *runs*: consecutive tokens whose positions step by one
stride within one document (zigzag and contiguous shards give runs of stride 1, striped ones
runs of stride W, packed documents one run per piece of a document; padding, id -1, is
dropped). Two runs of one stride see each other fully, not at all, or as a full rectangle beside
a top-left diagonal (the kernel's ``is_causal``); runs of different strides need an explicit
mask. Adjacent full rectangles are joined. Where runs are too many (arbitrary positions), or
the calls would cost more than one masked call over the block (tiny blocks), the plan is that
one call. Positions and document ids are CPU tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sptutor import blocks

# One call's fixed cost in multiply-adds of (query, key, head, dim) units: ~30 us of call, slicing
# and merge overhead at ~3e-11 s per unit (measured on one thread, H=8, D=64).
CALL_COST = 1_000_000
MAX_RUNS = 512  # more runs than this on either side: one masked call, no plan (arbitrary positions)


class Task(NamedTuple):
    """One kernel call: queries ``[q_lo, q_hi)`` against keys ``[k_lo, k_hi)`` (block indices).

    ``kind``: ``"full"`` (every pair visible, no mask), ``"causal"`` (query i of the task sees
    key j iff j <= i: the kernel's ``is_causal``) or ``"masked"`` (an explicit mask)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    kind: str


class _Run(NamedTuple):
    """Tokens ``[lo, hi)`` of a block at positions ``start + stride * i``, all in document doc."""

    lo: int
    hi: int
    start: int
    stride: int
    doc: int


def _runs(pos: torch.Tensor, doc: torch.Tensor | None) -> list[_Run] | None:
    """pos, doc: (S,) -> the block's runs (padding dropped), or None if there are too many."""
    steps = pos[1:] - pos[:-1]
    joined = steps > 0
    if doc is not None:
        joined &= doc[1:] == doc[:-1]
    keys, counts = torch.unique_consecutive(torch.where(joined, steps, 0), return_counts=True)
    if int((keys > 0).sum()) + int(counts[keys == 0].sum()) > MAX_RUNS:
        return None
    where = pos.tolist()
    docs = doc.tolist() if doc is not None else [0] * len(where)

    def single(i: int) -> _Run:
        return _Run(i, i + 1, where[i], 1, docs[i])

    runs, cursor, edge = [], 0, 0  # cursor: first token not in a run yet; edge: i -> i + 1
    for key, count in zip(keys.tolist(), counts.tolist()):
        lo = max(edge, cursor)  # a token shared with the previous run stays there
        # edges [edge, edge + count) step by key; a lone edge whose first token is taken joins
        # nothing: its last token starts the next run
        if key > 0 and lo < edge + count:
            runs += [single(i) for i in range(cursor, lo)]
            runs.append(_Run(lo, edge + count + 1, where[lo], key, docs[lo]))
            cursor = edge + count + 1
        edge += count
    runs += [single(i) for i in range(cursor, len(where))]
    return [run for run in runs if run.doc >= 0]


def _pair(qr: _Run, kr: _Run, causal: bool) -> list[Task]:
    """The calls that compute query run ``qr`` against key run ``kr`` of the same document."""
    if not causal:
        return [Task(qr.lo, qr.hi, kr.lo, kr.hi, "full")]
    q_last = qr.start + qr.stride * (qr.hi - qr.lo - 1)
    if kr.start > q_last:
        return []
    keys = min(kr.hi - kr.lo, (q_last - kr.start) // kr.stride + 1)  # keys some query sees
    skip = max(0, -((qr.start - kr.start) // qr.stride))  # queries before the first key
    first, q_lo, k_hi = qr.start + qr.stride * skip, qr.lo + skip, kr.lo + keys
    if kr.start + kr.stride * (keys - 1) <= first:  # the last key is before the first query
        return [Task(q_lo, qr.hi, kr.lo, k_hi, "full")]
    if qr.stride != kr.stride:  # both runs have >= 2 tokens here, so strides are real
        return [Task(q_lo, qr.hi, kr.lo, k_hi, "masked")]
    # key kr.lo + c + j is at or before query q_lo + i iff j <= i: keys before c are seen by all
    c = (first - kr.start) // kr.stride
    diagonal = [Task(q_lo, qr.hi, kr.lo + c, k_hi, "causal")]
    return ([Task(q_lo, qr.hi, kr.lo, kr.lo + c, "full")] if c else []) + diagonal


def _join(full: list[Task], same: tuple[str, str], lo: str, hi: str) -> list[Task]:
    """Full tasks equal in the ``same`` fields whose ``[lo, hi)`` ranges touch, joined."""
    joined: list[Task] = []
    for t in sorted(full, key=lambda t: (*(getattr(t, f) for f in same), getattr(t, lo))):
        last = joined[-1] if joined else None
        if last and [getattr(last, f) for f in (*same, hi)] == [getattr(t, f) for f in (*same, lo)]:
            joined[-1] = last._replace(**{hi: getattr(t, hi)})
        else:
            joined.append(t)
    return joined


def _cost(task: Task, work: int) -> int:
    """The modelled cost of one call (``work`` = B·Hq·D multiply-adds per visible pair)."""
    rows, keys = task.q_hi - task.q_lo, task.k_hi - task.k_lo
    pairs = rows * keys - (keys * (keys - 1) // 2 if task.kind == "causal" else 0)
    return pairs * work + CALL_COST


def plan(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    work: int = 1,
) -> list[Task]:
    """The kernel calls for one block: q_pos, q_doc (S_q,); k_pos, k_doc (S_k,) on the CPU.

    Together the tasks cover exactly the visible pairs (:func:`sptutor.blocks.visible_pairs`),
    each once; none if nothing is visible. ``work`` (B·Hq·D) weighs pairs against the fixed cost
    of a call: when the plan would cost more than one masked call over the whole block, that
    one call is the plan.
    """
    if (q_doc is None) != (k_doc is None):
        raise ValueError("give document ids for both queries and keys, or for neither")
    if len(q_pos) == 0 or len(k_pos) == 0:
        return []
    whole = [Task(0, len(q_pos), 0, len(k_pos), "masked")]
    q_runs, k_runs = _runs(q_pos, q_doc), _runs(k_pos, k_doc)
    if q_runs is None or k_runs is None:
        return whole if blocks.any_visible(q_pos, k_pos, causal, q_doc, k_doc) else []
    by_doc: dict[int, list[_Run]] = {}
    for run in k_runs:
        by_doc.setdefault(run.doc, []).append(run)
    tasks = [t for qr in q_runs for kr in by_doc.get(qr.doc, ()) for t in _pair(qr, kr, causal)]
    full = _join([t for t in tasks if t.kind == "full"], ("q_lo", "q_hi"), "k_lo", "k_hi")
    tasks = _join(full, ("k_lo", "k_hi"), "q_lo", "q_hi") + [t for t in tasks if t.kind != "full"]
    return whole if sum(_cost(t, work) for t in tasks) > _cost(whole[0], work) else tasks
