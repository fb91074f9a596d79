"""The body every rank runs for one case of a check: make the case's group, run your setup,
call your function on this rank's shards (forward, then backward), and send back what came out,
what it sent and what autograd kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from sptutor import capture, comm, layout, ledger
from sptutor.checker.adapter import Adapter, Context
from sptutor.checker.cases import Case

_GROUPS: dict[tuple[int, ...], object] = {}


def case_group(members: tuple[int, ...]):
    """The process group of ``members`` (the whole world's own group when they are all of it).

    Collective: every process of the launch calls it for every case, in the same order, as
    torch needs for each new group; a group is made once and reused.
    """
    if len(members) == dist.get_world_size():
        return dist.group.WORLD
    if members not in _GROUPS:
        _GROUPS[members] = comm.new_group(list(members))
    return _GROUPS[members]


def run_on_rank(
    rank: int, fn: Callable, adapter: Adapter, case: Case, device: str | torch.device = "cpu"
) -> dict | None:
    """One case on global rank ``rank``; None outside the case's members.

    Returns, in (B, S/W, H, D) on the CPU: ``out``, ``lse`` (B, Hq, S/W) or None, ``dq``, ``dk``,
    ``dv`` (None when the check is forward-only or autograd gave none), ``messages`` (events
    logged through sptutor's ledger, ``CommEvent.key()``), ``traffic`` ({phase: (messages,
    bytes)} of torch.distributed calls), ``saved`` (bytes autograd kept for backward) and
    ``notes`` (what went wrong on the way, in words).
    """
    group = case_group(case.members)
    local = case.members.index(rank) if rank in case.members else None
    extra = None
    if adapter.setup is not None:  # on every process: torch needs them all to make groups
        extra = adapter.setup(Context(local, case.world, group, case.members, case))
    if local is None:
        return None
    owned = adapter.owned(case)
    q, k, v, dout = (layout.shard_by(x, owned)[local].to(device) for x in case.inputs())
    yours = [adapter.to_yours(x) for x in (q, k, v)]
    if adapter.backward:
        yours = [x.requires_grad_() for x in yours]
    keywords = adapter.keywords(case, group, extra, local)
    keywords = {name: _to(value, device) for name, value in keywords.items()}
    saved, notes = [], []

    def count_saved(x):
        saved.append(x.numel() * x.element_size())
        return x

    with ledger.record() as led, capture.traffic() as seen, _uninitialised_is_nan():
        with seen.phase("forward"), torch.autograd.graph.saved_tensors_hooks(count_saved, _same):
            try:
                result = fn(*yours, **keywords)
            except TypeError as error:  # a keyword of ours it does not take: say which option
                hint = adapter.keyword_hint(error)
                if hint is None:
                    raise
                raise TypeError(f"{error}; {hint}") from error
        out_yours, lse = adapter.unpack(result)
        out = adapter.from_yours(out_yours, "out")
        if out.shape != q.shape:
            raise ValueError(f"out has shape {tuple(out.shape)} in (B, S/W, H, D), expected "
                             f"{tuple(q.shape)}: is the tensor layout "
                             f"{adapter.tensor_layout!r} right?")  # fmt: skip
        grads = [None, None, None]
        if adapter.backward and not out_yours.requires_grad:
            notes.append("out does not require grad: autograd cannot reach q, k, v")
        elif adapter.backward:
            with seen.phase("backward"):
                out_yours.backward(adapter.to_yours(dout).to(out_yours.dtype))
            grads = [adapter.from_yours(x.grad, name) for x, name in zip(yours, "qkv")]
    return dict(
        out=_cpu(out), lse=_cpu(lse), dq=_cpu(grads[0]), dk=_cpu(grads[1]), dv=_cpu(grads[2]),
        messages=[event.key() for event in led.messages()], traffic=seen.by_phase(),
        saved=sum(saved), notes=notes,
    )  # fmt: skip


@contextlib.contextmanager
def _uninitialised_is_nan():
    """While a case runs, ``torch.empty`` memory is filled with NaN (torch's deterministic mode,
    warnings only), so a buffer your code never writes shows as NaN, every run."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), (
        torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _same(x):
    return x


def _to(value, device):
    """Tensors among the keywords go to the case's device (the decay, for one)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()
