"""One case's verdict: every rank's shards against the oracle's, at the tolerance of the dtype
the case computes in; messages and saved bytes beside it, as information unless enforced.

The oracle runs in float64 on the case's inputs (rounded to its dtype first), so an error is
your code's own: at most ``tolerance(dtype)`` for float64 and float32; for float16 and bfloat16
at most 2x (3x for gradients) the error of plain torch attention computed in that dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from sptutor import layout, oracle
from sptutor.checker.cases import Case
from sptutor.tolerances import baseline_limit, gradient_floor, relative_error, tolerance

NAMES = ("out", "lse", "dq", "dk", "dv")
GRADIENTS = ("dq", "dk", "dv")


@dataclasses.dataclass
class RankVerdict:
    """How one rank's results compare: ``errors[name]`` relative error of each tensor checked
    (inf when missing or misshapen, with the reason in ``problems``), ``limits[name]`` its
    tolerance, ``information`` messages and memory in words; ``messages_match``: did this rank
    send what the oracle sends (exactly, when logged through sptutor's ledger: ``exact``; else
    in count and bytes per phase); ``saved_match``: did it keep the oracle's bytes for backward
    (None when forward only)."""

    rank: int
    errors: dict[str, float]
    limits: dict[str, float]
    problems: list[str]
    information: list[str]
    messages_match: bool = False
    exact: bool = False
    saved_match: bool | None = None
    difference: tuple | None = None  # (index, yours, the oracle's): the first message that differs

    @property
    def wrong(self) -> list[str]:
        """The tensors beyond their tolerance."""
        return [name for name, e in self.errors.items() if not e <= self.limits[name]]

    @property
    def passed(self) -> bool:
        return not self.wrong and not self.problems


@dataclasses.dataclass
class Expected:
    """The oracle's side of a case: the simulation (float64, steps recorded), the one in the
    case's dtype (``accounts``: its ledger and saved bytes), each rank's positions, and the
    tolerance of each (rank, tensor)."""

    sim: oracle.Simulation
    accounts: oracle.Simulation
    owned: list[torch.Tensor]
    limits: list[dict[str, float]]
    floors: list[float]  # each rank's least gradient scale: its rows' ‖dout‖ (gradient_floor)


def expect(case: Case, owned: list[torch.Tensor], backward: bool) -> Expected:
    """Run the oracle on ``case`` in float64 and work out each tensor's tolerance."""
    q, k, v, dout = case.inputs(torch.float64)
    floors = [gradient_floor(rows) for rows in layout.shard_by(dout, owned)]
    custom = case.layout == "custom"
    sim = oracle.simulate(
        case.method, q, k, v, dout if backward else None, world=case.world, causal=case.causal,
        layout="contiguous" if custom else case.layout, ulysses=case.ulysses,
        decay=case.decay_tensor(torch.float64), positions=owned if custom else None,
        record_steps=True, cu_seqlens=case.cu_seqlens_tensor(),
    )  # fmt: skip
    dtype = case.torch_dtype
    # bytes on the wire and kept for backward depend on the dtype: the oracle at the case's own
    accounts = sim if dtype == torch.float64 else oracle.simulate(
        case.method, q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype) if backward else None,
        world=case.world, causal=case.causal, layout="contiguous" if custom else case.layout,
        ulysses=case.ulysses, decay=case.decay_tensor(), positions=owned if custom else None,
        cu_seqlens=case.cu_seqlens_tensor(),
    )  # fmt: skip
    if dtype in (torch.float64, torch.float32):
        flat = {name: tolerance(dtype) for name in NAMES}
        limits = [dict(flat) for _ in range(case.world)]
    else:
        limits = _baseline_limits(case, sim, owned, backward, floors)
    return Expected(sim, accounts, owned, limits, floors)


def _baseline_limits(case, sim, owned, backward, floors) -> list[dict[str, float]]:
    """16-bit tolerances: a factor times the error of plain torch attention run in the case's
    dtype on the same inputs, shard by shard (the LSE at least float32's tolerance)."""
    q, k, v, dout = case.inputs()
    q, k, v = (x.requires_grad_(backward) for x in (q, k, v))
    if case.is_linear:
        out = oracle.full_linear_attention(q, k, v, case.causal, case.decay_tensor(),
                                           cu_seqlens=case.cu_seqlens_tensor())  # fmt: skip
        lse = None
    else:
        out, lse = oracle.full_attention(q, k, v, causal=case.causal,
                                         cu_seqlens=case.cu_seqlens_tensor())  # fmt: skip
    full = {"out": out, "lse": lse}
    if backward:
        full |= dict(zip(GRADIENTS, torch.autograd.grad(out, (q, k, v), dout)))
    limits = []
    for local, pos in enumerate(owned):
        limit = {}
        for name, baseline in full.items():
            if baseline is None:
                continue
            truth = getattr(sim.ranks[local], name)
            dim = 2 if name == "lse" else 1
            kind = "gradient" if name in GRADIENTS else "output"
            floor = floors[local] if kind == "gradient" else 0.0
            limit[name] = baseline_limit(baseline.detach().index_select(dim, pos), truth, kind,
                                         floor)  # fmt: skip
        limit["lse"] = max(limit.get("lse", 0.0), tolerance(torch.float32))
        limits.append(limit)
    return limits


def judge(
    case: Case, expected: Expected, results: list[dict], backward: bool, enforce: tuple = ()
) -> list[RankVerdict]:
    """Every rank's verdict; ``results[i]`` is what rank i of the case returned
    (``checker.worker.run_on_rank``)."""
    verdicts = []
    for local, result in enumerate(results):
        record, limits = expected.sim.ranks[local], expected.limits[local]
        saved_bytes = expected.accounts.ranks[local].saved_bytes
        errors, problems = {}, list(result["notes"])
        names = [n for n in NAMES if n != "lse" or not case.is_linear]
        for name in names:
            mine, theirs = result[name], getattr(record, name)
            if name in GRADIENTS and not backward:
                continue
            if name == "lse" and mine is None:
                continue  # an LSE is checked only when the function returns one
            if mine is None:
                problems.append(f"{name} is missing (autograd gave no gradient)")
                errors[name] = float("inf")
            elif tuple(mine.shape) != tuple(theirs.shape):
                problems.append(f"{name} has shape {tuple(mine.shape)}, expected "
                                f"{tuple(theirs.shape)}")  # fmt: skip
                errors[name] = float("inf")
            else:
                errors[name] = _error(mine, theirs, expected.floors[local] if name in GRADIENTS
                                      else 0.0)  # fmt: skip
        difference = _first_difference(case, expected, local, result, backward)
        messages, same = _messages(case, expected, local, result, backward, difference)
        saved = f"saved for backward: {result['saved']} bytes, the oracle {saved_bytes}"
        if not backward:
            saved = "saved for backward: not measured (forward only)"
        if "messages" in enforce and not same:
            problems.append(messages)
        if "saved" in enforce and backward and result["saved"] != saved_bytes:
            problems.append(saved)
        information = [messages, saved]
        saved_match = result["saved"] == saved_bytes if backward else None
        verdicts.append(RankVerdict(case.members[local], errors, limits, problems, information,
                                    same, bool(result["messages"]), saved_match,
                                    difference))  # fmt: skip
    return verdicts


def _error(mine: torch.Tensor, theirs: torch.Tensor, floor: float) -> float:
    """Relative error (a gradient's scale at least ``floor``); NaN anywhere is infinitely wrong."""
    if bool(torch.isnan(mine).any()):
        return float("inf")
    return relative_error(mine, theirs, floor)


def _first_difference(case, expected, local, result, backward) -> tuple | None:
    """(index, your key or None, the oracle's key or None) of the first message logged through
    sptutor's ledger that differs from the oracle's (keys: ``CommEvent.key()``); None if none
    differs or nothing was logged."""
    phases = ("forward", "backward") if backward else ("forward",)
    keys = [e.key() for e in expected.accounts.ledger.messages(local) if e.phase in phases]
    mine = [k for k in result["messages"] if k[4] in phases]
    if not mine or mine == keys:
        return None
    for index in range(max(len(mine), len(keys))):
        yours = mine[index] if index < len(mine) else None
        theirs = keys[index] if index < len(keys) else None
        if yours != theirs:
            return index, yours, theirs
    return None


def _messages(case, expected, local, result, backward, difference) -> tuple[str, bool]:
    """Messages in words, and whether they match: exact against the oracle's ledger when your
    code logged through sptutor's ledger (``difference``: the first that differs, from
    :func:`_first_difference`), else counts and bytes per phase of the torch.distributed calls
    seen."""
    rank = case.members[local]
    needed = expected.accounts.ledger.messages(local)
    phases = ("forward", "backward") if backward else ("forward",)
    if result["messages"]:
        wanted = sum(e.phase in phases for e in needed)
        if difference is None:
            return f"messages: as the oracle's, exactly ({wanted} logged)", True
        index, yours, theirs = difference
        if yours is None or theirs is None:
            mine = sum(k[4] in phases for k in result["messages"])
            return f"messages: {mine} logged, the oracle sends {wanted}", False
        return f"messages: message {index} is {yours}, the oracle's is {theirs}", False
    seen = []
    for phase in phases:
        count, nbytes = result["traffic"].get(phase, (0, 0))
        want = [e for e in needed if e.phase == phase]
        want_bytes = sum(e.nbytes for e in want)
        if (count, nbytes) != (len(want), want_bytes):
            seen.append(f"rank {rank} sends {nbytes} bytes in {phase} ({count} messages), the "
                        f"method needs {want_bytes} ({len(want)} messages)")  # fmt: skip
    if not seen:
        return "messages: as the oracle's in count and bytes per phase (torch.distributed)", True
    return "messages: " + "; ".join(seen), False
