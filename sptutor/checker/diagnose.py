"""Where a failing case is wrong, in words: which ranks and tensors, which token rows and heads,
and which simple mistake the wrong tensor matches.

For every wrong (rank, tensor) the wrong tensor is compared with a list of *candidates*: what the
tensor would be after a common mistake (another rank's shard, dK and dV swapped or summed, a
block left out of the merge, the merge done without LSE weights, the causal mask flipped or
strict, a missing softmax scale, a scale factor), built from the oracle's own per-step records
where the mistake is about steps. The first candidate that matches to the case's tolerance names
the mistake. Cells that match the right values elsewhere (another position, another head) are
reported as a permutation. Nothing matching is said as such: the rows and heads are still named.
"""

from __future__ import annotations

import torch

from sptutor.checker.candidates import candidates
from sptutor.checker.cases import Case
from sptutor.checker.compare import NAMES, Expected, RankVerdict
from sptutor.tolerances import relative_error

MAX_SENTENCES = 8


def diagnose(
    case: Case, expected: Expected, results: list[dict], verdicts: list[RankVerdict]
) -> list[str]:
    """Sentences for a failing case, most telling first: problems, then each wrong tensor with
    the ranks and rows where it is wrong and the mistake it matches (ranks alike are merged)."""
    sentences = [f"rank {v.rank}: {problem}" for v in verdicts for problem in v.problems]
    groups: dict[tuple[str, str], list[tuple[int, str, bool]]] = {}
    for name in NAMES:  # the forward's tensors first: a wrong forward explains the rest
        for local, verdict in enumerate(verdicts):
            if name in verdict.wrong and results[local][name] is not None:
                where, everywhere, why = _explain(case, expected, results, local, name)
                groups.setdefault((name, why), []).append((verdict.rank, where, everywhere))
    forward_wrong = any(name in ("out", "lse") for name, _ in groups)
    unexplained = []
    for (name, why), found in groups.items():
        if forward_wrong and name in ("dq", "dk", "dv") and not why:
            unexplained.append((name, found))
            continue
        why = why or "no mistake in sptutor's catalogue matches it"
        sentences.append(f"{name} wrong {_places(found)}: {why}")
    if unexplained:
        names = ", ".join(dict.fromkeys(name for name, _ in unexplained))
        ranks = sorted({rank for _, found in unexplained for rank, _, _ in found})
        sentences.append(f"{names} wrong too, on {_who(ranks)}: the backward starts from the "
                         "wrong forward, so fix the forward first")  # fmt: skip
    if len(sentences) > MAX_SENTENCES:
        hidden = len(sentences) - MAX_SENTENCES
        sentences = [*sentences[:MAX_SENTENCES], f"(and {hidden} more like these)"]
    return sentences


def _places(found: list[tuple[int, str, bool]]) -> str:
    """'on every row and head of ranks 0, 1' or 'on rank 2 rows 16..31 (...); rank 3 ...'."""
    ranks = [rank for rank, _, _ in found]
    if all(everywhere for _, _, everywhere in found):
        return f"on every row and head of {_who(ranks)}"
    return "on " + "; ".join(f"rank {rank} {where}" for rank, where, _ in found)


def _who(ranks: list[int]) -> str:
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"


def _explain(case, expected, results, local, name) -> tuple[str, bool, str]:
    """(where: rows and heads, wrong everywhere?, why: the mistake it matches, or what it
    looks like, or '' when nothing fits)."""
    mine = results[local][name].double()
    truth = getattr(expected.sim.ranks[local], name)
    limit = expected.limits[local][name]
    where, everywhere = _where(case, expected, local, name, mine, truth, limit)
    for candidate, meaning in candidates(case, expected, results, local, name):
        if tuple(candidate.shape) != tuple(mine.shape):
            continue
        if relative_error(mine, candidate) <= limit < relative_error(candidate, truth):
            return where, everywhere, meaning
    if torch.isnan(mine).any() or (torch.isinf(mine) & ~torch.isinf(truth)).any():
        bad = (~torch.isfinite(mine) & ~torch.isinf(truth)).sum().item()
        return where, everywhere, (f"{bad} values are NaN or inf: memory never written (check "
                                   "fills torch.empty with NaN), or 0/0 in a row whose keys "
                                   "were all masked")  # fmt: skip
    finite = torch.isfinite(truth)
    if mine[finite].abs().max() > 1e6 * max(truth[finite].abs().max().item(), 1.0):
        return where, everywhere, "it holds huge values: uninitialised memory (never written?)"
    if not mine.any():
        return where, everywhere, "it is all zeros: never written, or nothing was added to it"
    precision = _precision(case, name, mine, truth)
    if precision:
        return where, everywhere, precision
    zero_rows = _zero_rows(mine, truth, 2 if name == "lse" else 1)
    if zero_rows:
        return where, everywhere, (f"rows {_ranges(zero_rows)} are exactly zero: never written "
                                   "(an output buffer left partly unwritten)")  # fmt: skip
    return where, everywhere, _permutation(case, expected, local, name, mine, limit)


def _precision(case, name, mine, truth) -> str:
    """'right only to bfloat16's precision ...' when the error is a lower dtype's rounding than
    the one the tensor is judged in (the LSE of 16-bit inputs: float32)."""
    error = relative_error(mine, truth)
    judged = torch.float32 if name == "lse" and case.dtype in ("float16", "bfloat16") else (
        case.torch_dtype)  # fmt: skip
    for lower in (torch.float32, torch.bfloat16, torch.float16):
        eps = torch.finfo(lower).eps
        # rounding to ``lower`` costs at most eps/2 per value; sums of a few add a small factor
        if eps > torch.finfo(judged).eps and error <= 4 * eps:
            return (f"right only to {str(lower).removeprefix('torch.')}'s precision (error "
                    f"{error:.1e}, its eps {eps:.1e}): it computes in, or rounds through, "
                    f"{str(lower).removeprefix('torch.')}")  # fmt: skip
    return ""


def _zero_rows(mine, truth, dim) -> list[int]:
    """Rows that are exactly zero in ``mine`` but not in ``truth``."""
    mine_rows = mine.movedim(dim, 0).flatten(1)
    truth_rows = truth.nan_to_num(0.0, 0.0, 0.0).movedim(dim, 0).flatten(1)
    zero = (mine_rows == 0).all(dim=1) & (truth_rows != 0).any(dim=1)
    return zero.nonzero().flatten().tolist()


def _where(case, expected, local, name, mine, truth, limit) -> tuple[str, bool]:
    """('rows 16..31 (positions 48..63), right on rows 0..15; all heads', wrong everywhere?)
    and, for softmax outputs, whether the right rows are those that need only this rank's own
    keys."""
    rows = _bad_along(mine, truth, limit, 2 if name == "lse" else 1)
    heads = _bad_along(mine, truth, limit, 1 if name == "lse" else 2)
    owned = expected.owned[local]
    good = [i for i in range(len(owned)) if i not in set(rows)]
    all_heads = len(heads) == mine.shape[1 if name == "lse" else 2]
    text = f"rows {_ranges(rows)} (positions {_ranges(owned[rows].tolist())})"
    if good:
        text += f", right on rows {_ranges(good)}"
    text += ", all heads" if all_heads else f", heads {_ranges(heads)} only"
    if name in ("out", "lse") and not case.is_linear and good:
        own_only = _sees_own_keys_only(case, expected, local)
        if all(own_only[i] for i in good) and not any(own_only[i] for i in rows):
            text += (" (the rows that need only this rank's own keys are right: the blocks "
                     "from other ranks are merged wrongly)")  # fmt: skip
    return text, not good and all_heads


def _bad_along(mine, truth, limit, dim) -> list[int]:
    """Indices along ``dim`` whose slice is wrong, relative to the slice's own scale."""
    diff = (mine - truth).nan_to_num(nan=float("inf")).movedim(dim, 0).flatten(1)
    scale = truth.nan_to_num(0.0, 0.0, 0.0).movedim(dim, 0).flatten(1).norm(dim=1)
    floor = scale.max().clamp_min(1e-300) * 1e-3  # rows that are ~0 are judged on the whole
    both_inf = (mine == truth).movedim(dim, 0).flatten(1)
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    errors = diff.norm(dim=1) / torch.maximum(scale, floor)
    return [i for i, e in enumerate(errors.tolist()) if not e <= limit]


def _sees_own_keys_only(case, expected, local) -> list[bool]:
    """For each of this rank's query rows: do all its visible keys live on this rank?"""
    owned = expected.owned[local]
    mine = torch.zeros(case.seq_len, dtype=torch.bool)
    mine[owned] = True
    if not case.causal:
        return [bool(mine.all())] * len(owned)
    return [bool(mine[: p + 1].all()) for p in owned.tolist()]


def _permutation(case, expected, local, name, mine, limit) -> str:
    """Do the wrong cells hold right values from elsewhere (other positions or heads)?"""
    sim = expected.sim
    full = getattr(sim, name)  # (B, S, H, D), or lse (B, H, S)
    if name == "lse":
        full, mine = full.transpose(1, 2)[..., None], mine.transpose(1, 2)[..., None]
    truth = full.index_select(1, expected.owned[local])
    bad = (mine - truth).abs().amax(dim=(0, 3)) > limit * truth.abs().amax().clamp_min(1e-300)
    cells = bad.nonzero().tolist()  # (row, head) pairs
    if not cells:
        return ""
    pool = full.permute(1, 2, 0, 3).flatten(2)  # (S, H, B*D)
    found = []
    for row, head in cells[:64]:
        cell = mine[:, row, head, :].flatten()
        distance = (pool - cell).norm(dim=2) / cell.norm().clamp_min(1e-300)
        # one cell's relative error can be ~10x the tensor's (a small cell's own rounding)
        where = (distance <= max(limit, 1e-12) * 10).nonzero().tolist()
        if not where:
            return ""
        found.append((row, head, *where[0]))
    owned = expected.owned[local].tolist()
    if all((p, g) == (owned[r], h) for r, h, p, g in found):
        error = relative_error(mine, truth)
        return (f"close to the right values, but not within the tolerance (error {error:.1e}): "
                "rounding, e.g. an accumulator or LSE kept in a lower precision")  # fmt: skip
    hint = ""
    if case.method in ("ulysses", "usp"):
        hint = " (the all-to-all sends chunks to the wrong ranks, or in the wrong order)"
    if all(p == owned[r] for r, _, p, _ in found):
        heads = sorted({(h, g) for _, h, _, g in found})
        if len({h for h, _ in heads}) == len(heads):  # each wrong head holds one other head
            pairs = ", ".join(f"head {h} holds head {g}'s" for h, g in heads)
            return f"the heads are permuted: {pairs}{hint}"
    moved = [f"row {r} head {h} holds position {p} head {g}" for r, h, p, g in found[:4]]
    more = " ..." if len(found) > 4 else ""
    return f"values sit at the wrong token rows or heads ({'; '.join(moved)}{more}){hint}"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}..{x}")
            start = None
    return ", ".join(parts) or "none"
