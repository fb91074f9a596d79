"""Capture what unmodified ``torch.distributed`` code puts on the wire, by the ledger's rule.

While :func:`traffic` is open, this process's ``torch.distributed`` communication functions are
replaced by wrappers that record one :class:`Call` per tensor this rank sends, then call the
original; everything is put back on exit (nested captures and exceptions too). A wrapper replaces
the function wherever a module holds it: ``torch.distributed.X``,
``torch.distributed.distributed_c10d.X`` and aliases bound at import time
(``gather = dist.all_gather_into_tensor``, a common shim over torch versions).

Bytes follow ``ledger.wire_bytes`` (T = ``numel() * element_size()`` of the tensor the rule
names; W = the group's size), so captured traffic compares with a ledger per op:

- ``send``, ``isend``, each isend of ``batch_isend_irecv``: op ``send``, T, ``peer`` global.
- ``all_to_all_single``, ``all_to_all``: op ``all_to_all``, T the whole input. Uneven splits count
  exactly what leaves (T minus the chunk that stays home), which is the rule for even splits.
- ``all_gather``, ``all_gather_into_tensor``, ``_all_gather_base``, ``all_gather_single``:
  op ``all_gather``, T the input chunk.
- ``reduce_scatter``, ``reduce_scatter_tensor``, ``_reduce_scatter_base``,
  ``reduce_scatter_single``: op ``reduce_scatter``, T the output chunk.
- ``all_reduce``: op ``all_reduce``, T the tensor.
- Outside the ledger's ops, under their own names: ``broadcast`` and ``reduce`` count
  T·(W−1)//W on every rank (the group moves at least T·(W−1) in total, as each of the W−1 other
  ranks receives or contributes T; which rank forwards what depends on the backend's tree, so it
  is spread evenly, as the ledger does for all-to-all); ``scatter`` counts (W−1) output chunks on
  the root only, ``gather`` the input on every rank but the root.

Nothing is recorded for receives (the ledger logs senders only), a group of one, or a rank
outside the group. A torch function that calls others (``send`` calls ``isend``,
``batch_isend_irecv`` the isends, ``all_gather_into_tensor`` ``all_gather_single``) counts once.
Object collectives (``all_gather_object`` and the like) and barriers are control traffic: they
and the tensor calls inside them are not recorded. ``torch.distributed.nn.functional`` calls
``dist.*`` at call time, forward and backward, so it is captured (its ``all_to_all`` on gloo is a
loop of ``scatter`` calls, recorded as such). Nothing here is gloo-specific: NCCL from torchrun
is captured the same way.

Not captured: functional collectives (``torch.distributed._functional_collectives``, DTensor,
``torch.compile``'d code, all ``torch.ops._c10d_functional``); ``ProcessGroup`` methods called
directly and c10d ops called from C++ (DDP's reducer); ``*_coalesced`` functions; a function kept
anywhere but a module attribute (an instance attribute, a default argument, a container). A
``P2POp`` made inside a capture must be used inside it: its ``op`` is the wrapper, which torch's
``batch_isend_irecv`` no longer recognises as ``isend`` afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from sptutor import ledger

# torch function -> the op it is recorded as (functions missing from this torch are skipped)
RECORDED = {
    "send": "send", "isend": "send", "batch_isend_irecv": "send",
    "all_to_all_single": "all_to_all", "all_to_all": "all_to_all",
    "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather", "all_gather_single": "all_gather",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
    "all_reduce": "all_reduce",
    "broadcast": "broadcast", "reduce": "reduce", "scatter": "scatter", "gather": "gather",
}  # fmt: skip
MUTED = (
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list", "barrier", "monitored_barrier",
)  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One tensor this rank put on the wire through a ``torch.distributed`` function.

    ``op``: the ledger's name (``send``, ``all_to_all``, ``all_gather``, ``reduce_scatter``,
    ``all_reduce``) or ``broadcast``/``reduce``/``scatter``/``gather``; ``nbytes``: what this rank
    sends by the ledger's rule; ``peer``: the global destination of a send (None for collectives);
    ``phase``: the innermost open :meth:`Traffic.phase` (None if none); ``group_size``: W;
    ``api``: the torch function called (e.g. ``all_to_all_single``).
    """

    op: str
    nbytes: int
    peer: int | None
    phase: str | None
    group_size: int
    api: str


@dataclass(eq=False)
class Traffic:
    """The calls captured by one :func:`traffic` block, in the order this rank made them."""

    calls: list[Call] = field(default_factory=list)
    _phases: list[str] = field(default_factory=list, init=False, repr=False)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the calls made inside the block ``name`` (phases nest; the innermost wins)."""
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    def _add(self, op: str, nbytes: int, peer: int | None, group_size: int, api: str) -> None:
        phase = self._phases[-1] if self._phases else None
        self.calls.append(Call(op, nbytes, peer, phase, group_size, api))

    def _in(self, phase: str | None) -> list[Call]:
        return [c for c in self.calls if phase is None or c.phase == phase]

    def count(self, phase: str | None = None) -> int:
        """Messages sent in ``phase`` (or in all phases)."""
        return len(self._in(phase))

    def bytes_sent(self, phase: str | None = None) -> int:
        """Bytes put on the wire in ``phase`` (or in all phases)."""
        return sum(c.nbytes for c in self._in(phase))

    def by_phase(self) -> dict[str | None, tuple[int, int]]:
        """``{phase: (messages, bytes)}`` in order of first appearance (None: outside a phase)."""
        totals: dict[str | None, tuple[int, int]] = {}
        for c in self.calls:
            count, nbytes = totals.get(c.phase, (0, 0))
            totals[c.phase] = (count + 1, nbytes + c.nbytes)
        return totals


class _Busy(threading.local):
    depth = 0  # > 0 while this thread is inside a wrapped torch function


_busy = _Busy()
_open: list[Traffic] = []
_patched: list[tuple[dict, str, Callable, Callable]] = []  # (namespace, name, original, wrapper)


@contextlib.contextmanager
def traffic() -> Iterator[Traffic]:
    """Record the tensors this process sends through ``torch.distributed`` while the block runs.

    Captures nest: a call goes to every open capture, labelled by that capture's own phase.
    """
    seen = Traffic()
    if not _open:
        _install()
    _open.append(seen)
    try:
        yield seen
    finally:
        _open.remove(seen)
        if not _open:
            _uninstall()


def _install() -> None:
    """Put a wrapper wherever a module holds one of the functions (aliases included)."""
    originals = {name: getattr(c10d, name) for name in (*RECORDED, *MUTED) if hasattr(c10d, name)}
    wrappers = {id(f): (f, _wrap(name, f)) for name, f in originals.items()}
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        namespace = vars(module)
        for attribute, value in list(namespace.items()):
            if id(value) in wrappers and wrappers[id(value)][0] is value:
                original, wrapper = wrappers[id(value)]
                namespace[attribute] = wrapper
                _patched.append((namespace, attribute, original, wrapper))


def _uninstall() -> None:
    """Put every original back, unless something else replaced our wrapper since."""
    while _patched:
        namespace, attribute, original, wrapper = _patched.pop()
        if namespace.get(attribute) is wrapper:
            namespace[attribute] = original


def _wrap(name: str, original: Callable) -> Callable:
    """``original`` recording what it sends into every open capture (or muted, see MUTED)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if _busy.depth or not _open:  # called by another torch function, or after the capture
            return original(*args, **kwargs)
        if name == "batch_isend_irecv":
            args, kwargs = (_current_ops(*args, **kwargs),), {}
        _busy.depth += 1
        try:
            result = original(*args, **kwargs)
        finally:
            _busy.depth -= 1
        if name in RECORDED:  # measured after the call: a call that raised sent nothing
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for nbytes, peer, size in _measure(name, bound.arguments):
                for seen in _open:
                    seen._add(RECORDED[name], nbytes, peer, size, name)
        return result

    return wrapper


def _current_ops(p2p_op_list: list) -> list:
    """P2POps made before the capture hold the original ``isend``, which torch's
    ``batch_isend_irecv`` (comparing with the wrapper now) would take for a receive: rebind."""
    fresh = []
    for p2p in p2p_op_list:
        if getattr(p2p.op, "__name__", "") == "isend" and p2p.op is not c10d.isend:
            rebound = object.__new__(type(p2p))  # a copy, without P2POp's argument checks
            rebound.__dict__.update(vars(p2p), op=c10d.isend)
            p2p = rebound
        fresh.append(p2p)
    return fresh


def _measure(name: str, a: dict) -> list[tuple[int, int | None, int]]:
    """``(nbytes, peer, group_size)`` for each tensor this rank sent in call ``name(**a)``."""
    if name == "batch_isend_irecv":
        sends = [p for p in a["p2p_op_list"] if p.op is c10d.isend]
        return [m for p in sends for m in _send(p.tensor, p.group, p.peer)]
    group, op = a.get("group"), RECORDED[name]
    size = dist.get_world_size(group)
    if size <= 1:  # a group of one, or a rank outside the group (-1): nothing moves
        return []
    if op == "send":
        return _send(a["tensor"], group, _global(group, a.get("dst"), a.get("group_dst")))
    if op == "all_to_all":
        return [(_all_to_all_sent(a, dist.get_rank(group), size), None, size)]
    if op in ("broadcast", "reduce"):
        return [(_nbytes(a["tensor"]) * (size - 1) // size, None, size)]
    if op in ("scatter", "gather"):
        root = _global(group, a.get("src", a.get("dst")), a.get("group_src", a.get("group_dst")))
        is_root = root == dist.get_rank()
        if op == "scatter":  # the root sends every output chunk but its own
            return [(_nbytes(a["tensor"]) * (size - 1), None, size)] if is_root else []
        return [] if is_root else [(_nbytes(a["tensor"]), None, size)]
    # the tensor the rule is stated on: the output chunk of a reduce-scatter, else the input
    chunk = a["output"] if op == "reduce_scatter" else a.get("input_tensor", a.get("tensor"))
    return [(ledger.wire_bytes(op, _nbytes(chunk), size), None, size)]


def _send(tensor: torch.Tensor, group, peer: int) -> list[tuple[int, int | None, int]]:
    size = dist.get_world_size(group)
    if size <= 1:
        return []
    return [(ledger.wire_bytes("send", _nbytes(tensor), size), peer, size)]


def _all_to_all_sent(a: dict, rank: int, size: int) -> int:
    """Bytes of the input that leave this rank: the rule's T·(W−1)//W when the chunks are equal,
    else T minus the chunk that stays home."""
    if "input_tensor_list" in a:
        chunks = [_nbytes(x) for x in a["input_tensor_list"]]
    elif a["input_split_sizes"]:
        row = _nbytes(a["input"]) // max(a["input"].shape[0], 1)
        chunks = [split * row for split in a["input_split_sizes"]]
    else:
        chunks = [_nbytes(a["input"]) // size] * size
    if len(set(chunks)) == 1:
        return ledger.wire_bytes("all_to_all", sum(chunks), size)
    return sum(chunks) - chunks[rank]


def _global(group, global_rank: int | None, group_rank: int | None) -> int:
    """A global rank from either spelling torch takes (both None: group rank 0, torch's default)."""
    if global_rank is not None:
        return global_rank
    group_rank = group_rank or 0
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()
