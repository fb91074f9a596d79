"""Thin wrappers over ``torch.distributed``: every message a method sends goes through here.

Each wrapper records one ``CommEvent`` per tensor this rank puts on the wire, in every open
``ledger.record()``, by the rules of Design, *The ledger* (the sender logs, ranks are global, bytes
from ``ledger.wire_bytes``; a group of one rank moves nothing and logs nothing). Tensors are made
contiguous before they are sent (gloo refuses strided ones), peers are computed from the group, and
renamed collectives of newer torch versions are hidden here.

Every call that can block tells an installed progress hook (``set_progress_hook``; see
``sptutor.exercises.progress``) when this rank enters and leaves it, so a stall can be located
from outside a hung process; without a hook that costs one ``if`` per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from sptutor import ledger
from sptutor.ledger import CommEvent

# torch >= 2.13 renamed the tensor-in/tensor-out collectives (the old names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_group_timeout: timedelta | None = None  # set by the launcher; None = torch's default (30 min)


def set_group_timeout(timeout: timedelta | None) -> None:
    """The timeout every group made by :func:`new_group` gets (the launcher passes its own)."""
    global _group_timeout
    _group_timeout = timeout


def new_group(ranks: list[int]) -> dist.ProcessGroup:
    """``dist.new_group(ranks)`` with the launch's timeout, not torch's 30-minute default, so a
    stuck peer in a sub-group fails like one in the world group. Collective over the world."""
    return dist.new_group(list(ranks), timeout=_group_timeout)


# hook(event, op, peer, phase, step): event "enter" or "leave", peer a global rank or None
ProgressHook = Callable[[str, str, int | None, str, int], None]
_progress_hook: ProgressHook | None = None
_UNREPORTED = contextlib.nullcontext()


def set_progress_hook(hook: ProgressHook | None) -> None:
    """Install the hook every blocking call of this module reports to (None: report nothing)."""
    global _progress_hook
    _progress_hook = hook


def _blocking(
    op: str, peer: int | None, phase: str, step: int
) -> contextlib.AbstractContextManager:
    """Around a call that can block: the hook hears "enter" before it and "leave" after it."""
    if _progress_hook is None:
        return _UNREPORTED
    return _reported(_progress_hook, op, peer, phase, step)


@contextlib.contextmanager
def _reported(hook: ProgressHook, op: str, peer: int | None, phase: str, step: int) -> Iterator:
    hook("enter", op, peer, phase, step)
    yield  # an error inside leaves the rank reported as waiting there, which it was
    hook("leave", op, peer, phase, step)


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank inside ``group`` (None = the default group) and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of the ``group_rank``-th member of ``group``."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _log(op: str, group, peer: int | None, tensor_bytes: int, phase: str, step: int) -> None:
    _, size = rank_and_size(group)
    sent = ledger.wire_bytes(op, tensor_bytes, size)
    members = tuple(global_rank(group, r) for r in range(size))
    ledger.log(CommEvent(op, dist.get_rank(), peer, sent, phase, step, group=members))


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class RingShift:
    """Tensors on their way to the next rank of a ring, while ours arrive from the previous one.

    Started by :func:`ring_shift` (non-blocking, so the caller computes while blocks travel);
    :meth:`wait` returns the tensors received from the previous rank. The previous rank's block
    may hold a different number of tokens than ours (uneven shards): ``receive_tokens`` sizes
    the receive buffers along dim 1 (default: our tensors' own shapes).
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        group,
        *,
        phase: str,
        step: int,
        receive_tokens: int | None = None,
    ) -> None:
        rank, size = rank_and_size(group)
        self.phase, self.step = phase, step
        self.received = [_buffer_like(x, receive_tokens) for x in tensors]
        if size == 1:
            self.received, self.requests, self.waits = tensors, [], []
            return
        next_rank, prev_rank = (
            global_rank(group, (rank + 1) % size),
            global_rank(group, (rank - 1) % size),
        )
        operations = []
        for x, buffer in zip(tensors, self.received):
            _log("send", group, next_rank, _nbytes(x), phase, step)
            operations.append(dist.P2POp(dist.isend, x.contiguous(), next_rank, group))
            operations.append(dist.P2POp(dist.irecv, buffer, prev_rank, group))
        self.requests = dist.batch_isend_irecv(operations)  # on gloo none of it blocks
        # what each request waits for: gloo gives one per operation, NCCL one for the whole batch
        each = [("send", next_rank), ("recv", prev_rank)] * len(tensors)
        self.waits = each if len(self.requests) == len(each) else [("recv", prev_rank)]

    def wait(self) -> list[torch.Tensor]:
        """Block until every transfer is done; return what the previous rank sent."""
        for request, (op, peer) in zip(self.requests, self.waits):
            with _blocking(op, peer, self.phase, self.step):
                request.wait()
        return self.received


def _buffer_like(x: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """An empty tensor like ``x`` (B, S, ...), with ``tokens`` along dim 1 when given."""
    shape = list(x.shape)
    if tokens is not None:
        shape[1] = tokens
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def ring_shift(
    tensors: list[torch.Tensor],
    group,
    *,
    phase: str,
    step: int,
    receive_tokens: int | None = None,
) -> RingShift:
    """Send ``tensors`` (each (B, S_r, ...)) to the next rank of ``group`` and receive the
    previous rank's (async), each with ``receive_tokens`` tokens on dim 1 (default: as ours)."""
    return RingShift(tensors, group, phase=phase, step=step, receive_tokens=receive_tokens)


def send(x: torch.Tensor, dst: int, group, *, phase: str, step: int = 0) -> None:
    """Send ``x`` to group rank ``dst`` (blocking)."""
    peer = global_rank(group, dst)
    _log("send", group, peer, _nbytes(x), phase, step)
    with _blocking("send", peer, phase, step):
        dist.send(x.contiguous(), peer, group=group)


def recv(like: torch.Tensor, src: int, group, *, phase: str = "", step: int = 0) -> torch.Tensor:
    """Receive a tensor shaped like ``like`` from group rank ``src`` (receives are not logged;
    ``phase`` and ``step`` only say where this rank waits, to the progress hook)."""
    buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    peer = global_rank(group, src)
    with _blocking("recv", peer, phase, step):
        dist.recv(buffer, peer, group=group)
    return buffer


def all_to_all(
    chunks: list[torch.Tensor], group, *, phase: str, step: int = 0
) -> list[torch.Tensor]:
    """``chunks[j]`` goes to group rank j; returns ``received[i]`` from group rank i.

    All chunks have one shape; this rank's input is all of them (one stays home).
    """
    _, size = rank_and_size(group)
    if size == 1:
        return chunks
    stacked = torch.stack(chunks)  # (W, *chunk)
    _log("all_to_all", group, None, _nbytes(stacked), phase, step)
    received = torch.empty_like(stacked)
    with _blocking("all_to_all", None, phase, step):
        dist.all_to_all_single(received, stacked, group=group)
    return list(received.unbind(0))


def all_gather(x: torch.Tensor, group, *, phase: str, step: int = 0) -> torch.Tensor:
    """Every group rank's ``x``, in group-rank order: (W, *x.shape), ``[j]`` from group rank j.

    The result is the very buffer the collective wrote into (no copy after it), so a caller that
    keeps it keeps one copy of the gathered data.
    """
    _, size = rank_and_size(group)
    if size == 1:
        return x[None]
    _log("all_gather", group, None, _nbytes(x), phase, step)
    # flat buffers: gloo wants the output as the inputs concatenated along dim 0, not stacked
    gathered = x.new_empty(size * x.numel())
    with _blocking("all_gather", None, phase, step):
        _all_gather(gathered, x.contiguous().reshape(-1), group=group)
    return gathered.view(size, *x.shape)  # (W, *x.shape)


def reduce_scatter(chunks: list[torch.Tensor], group, *, phase: str, step: int = 0) -> torch.Tensor:
    """``chunks[j]`` is this rank's contribution to group rank j; returns the sum of ours."""
    rank, size = rank_and_size(group)
    if size == 1:
        return chunks[0]
    _log("reduce_scatter", group, None, _nbytes(chunks[rank]), phase, step)
    output = torch.empty(chunks[rank].numel(), dtype=chunks[rank].dtype, device=chunks[rank].device)
    # flat buffers: gloo wants the input as the chunks concatenated along dim 0, not stacked
    with _blocking("reduce_scatter", None, phase, step):
        _reduce_scatter(output, torch.stack(chunks).reshape(-1), group=group)
    return output.reshape(chunks[rank].shape)


def all_reduce(x: torch.Tensor, group, *, phase: str, step: int = 0) -> torch.Tensor:
    """The sum of every group rank's ``x`` (a new tensor; ``x`` is untouched)."""
    _, size = rank_and_size(group)
    if size == 1:
        return x
    _log("all_reduce", group, None, _nbytes(x), phase, step)
    total = x.clone(memory_format=torch.contiguous_format)
    with _blocking("all_reduce", None, phase, step):
        dist.all_reduce(total, group=group)
    return total
