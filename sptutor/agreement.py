"""Do the ranks of a group agree on the call? One small check before a method's first message.

Every rank of a group must call a method with the same arguments: a different ``causal``,
``layout``, ``scale``, dtype, head count or shard length on one rank gives a silent wrong answer
or a deadlock deep inside the backend. Each rank can check its own inputs (``sptutor.checks``),
but only a message can compare them with the others'. So before the first message of a call,
every rank sends the others a short description of its call (one ``all_gather_object``) and all
of them raise the same ``ValueError``, naming what differs and on which ranks, if any differ.

The check runs once per (group, call signature) in a process and is cached: a training loop pays
for it on its first step only. It is a check, not part of any method, so it goes straight to
``torch.distributed`` and is **not logged in the ledger**: byte counts, ledger equality with the
oracle and the closed forms of ``sptutor.cost`` are unaffected. ``SPTUTOR_CHECK_RANKS=0`` turns it
off. The cache means a rank that changes its arguments later, while the others do not, is checked
only if its new signature is new to every rank; a stuck call then ends with the group's timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

_agreed: set[tuple] = set()  # (group key, signature) pairs this process has checked


def _enabled() -> bool:
    return os.environ.get("SPTUTOR_CHECK_RANKS", "1") != "0"


def check_membership(group: dist.ProcessGroup | None, method: str) -> None:
    """A process outside ``group`` must not call a method over it (ValueError)."""
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"{method}: this process (global rank {dist.get_rank()}) is not a member of the "
            "group it passed; call the method on the group's ranks only"
        )


def signature(
    method: str, q: torch.Tensor, k: torch.Tensor, **arguments: object
) -> tuple[tuple[str, object], ...]:
    """What every rank must agree on: the method, shapes, dtype and the method's arguments.

    q: (B, S/W, Hq, D), k: (B, S/W, Hkv, D) this rank's shards; ``arguments`` the method's
    keywords (tensors such as ``decay`` are described by their values). The shard length is
    listed as ``tokens``: ranks may hold different counts only where the layout says so.
    """
    batch, tokens, heads_q, head_dim = q.shape
    fields = {"method": method, "dtype": str(q.dtype).removeprefix("torch."), "B": batch,
              "Hq": heads_q, "Hkv": k.shape[2], "D": head_dim, "tokens": tokens}  # fmt: skip
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            value = tuple(value.detach().cpu().reshape(-1).tolist())
        fields[name] = value
    return tuple(fields.items())


def check_ranks_agree(
    group: dist.ProcessGroup | None,
    call: tuple[tuple[str, object], ...],
    tokens_by_layout: Callable[[int], list[int]],
) -> None:
    """Raise ``ValueError`` on every rank unless all ranks of ``group`` made the same ``call``.

    ``call`` comes from :func:`signature`; ``tokens_by_layout(S)`` is how many tokens each group
    rank holds when the layout cuts a global sequence of S tokens (it raises ``ValueError`` for
    an S the layout cannot cut). Shard lengths are compared with the layout of S = their sum,
    so ranks may differ exactly where the layout says they do. Collective over ``group`` the
    first time a signature is seen.
    """
    if not _enabled() or dist.get_world_size(group) == 1:
        return
    key = (id(group if group is not None else dist.group.WORLD), call)
    if key in _agreed:
        return
    calls: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(calls, call, group=group)  # not a method message: never logged
    problem = _disagreement(calls, tokens_by_layout)
    if problem:
        raise ValueError(problem)
    _agreed.add(key)


def _disagreement(calls: list[tuple], tokens_by_layout: Callable[[int], list[int]]) -> str | None:
    """The first field on which the group ranks' ``calls`` differ, as a sentence, or None."""
    fields = [dict(call) for call in calls]
    for name in fields[0]:
        if name == "tokens":
            continue
        values = [f.get(name) for f in fields]
        if len(set(map(repr, values))) > 1:
            per_rank = ", ".join(f"rank {r}: {value!r}" for r, value in enumerate(values))
            hint = ("; when W does not divide S, pass the same seq_len=S (or cu_seqlens) on "
                    "every rank") if name == "S" else ""  # fmt: skip
            return f"ranks disagree on {name} in {fields[0]['method']} ({per_rank}){hint}"
    tokens = [f["tokens"] for f in fields]
    seq_len = fields[0].get("S", sum(tokens))  # the S every rank agreed on, if it says one
    try:
        expected = tokens_by_layout(seq_len)
    except ValueError as cannot_cut:  # an S no layout can cut: every rank says the layout's words
        return str(cannot_cut)
    if tokens != expected:
        return (
            f"ranks hold {tokens} tokens in {fields[0]['method']}, but the layout of "
            f"S={seq_len} over W={len(tokens)} ranks gives {expected}; shard every rank's "
            "input with sptutor.layout.shard of the same global sequence"
        )
    return None
