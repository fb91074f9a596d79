"""sptutor.capture: what torch.distributed calls put on the wire, by the ledger's rule.

Two launches: W=2 calls every captured function through both spellings (``torch.distributed.X``
and ``distributed_c10d.X``) plus the special cases; W=4 runs the real methods under both
``ledger.record()`` and ``capture.traffic()``, which must agree message by message.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.distributed.nn.functional as dist_autograd
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import sptutor
from sptutor import capture, comm, launch, ledger
from sptutor.capture import Call
from tests.distributed.harness import GROUPS, linear_cases, per_group, softmax_cases, ulysses_cases

GATHERS = [n for n in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single")
           if hasattr(c10d, n)]  # fmt: skip
SCATTERS = [n for n in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single")
            if hasattr(c10d, n)]  # fmt: skip
GROUP_RANKS = "group_dst" in inspect.signature(dist.send).parameters  # torch >= 2.6
DTYPES = ("float16", "bfloat16", "float32", "float64", "int64")
SHIM = dist.all_reduce  # an alias bound at import time, as version shims do


def wait(works: list) -> None:
    """Wait for each request of a non-blocking call."""
    for work in works:
        work.wait()


def _probes(m, rank: int, other: int, x: torch.Tensor) -> dict:
    """label -> a call of module ``m``'s functions on the default group of W=2 (x: (n,))."""
    n, empty = x.numel(), functools.partial(torch.empty_like, x)
    splits, received = ([1, 2], [1, 3]) if rank == 0 else ([3, 1], [2, 1])  # uneven all-to-all
    in_rows, out_rows = x.expand(sum(splits), n).contiguous(), x.new_empty(sum(received), n)

    def two_sends():  # made inside the capture: P2POp checks its op against the wrapper
        return [m.P2POp(m.isend, x, other), m.P2POp(m.irecv, empty(), other),
                m.P2POp(m.isend, x.repeat(2), other),
                m.P2POp(m.irecv, x.new_empty(2 * n), other)]  # fmt: skip

    probes = {
        "send": lambda: m.send(x, other) if rank == 0 else m.recv(empty(), other),
        "isend": lambda: wait([m.isend(x, other), m.irecv(empty(), other)]),
        "batch_isend_irecv": lambda: wait(m.batch_isend_irecv(two_sends())),
        "all_to_all_single": lambda: m.all_to_all_single(x.new_empty(2 * n), x.repeat(2)),
        "uneven": lambda: m.all_to_all_single(out_rows, in_rows, received, splits),
        "all_to_all": lambda: m.all_to_all([empty(), empty()], [x, x]),
        "all_gather": lambda: m.all_gather([empty(), empty()], x),
        "reduce_scatter": lambda: m.reduce_scatter(empty(), [x, x]),
        "all_reduce": lambda: m.all_reduce(x.clone()),
        "broadcast": lambda: m.broadcast(x.clone(), 0),
        "reduce": lambda: m.reduce(x.clone(), 0),
        "scatter": lambda: m.scatter(empty(), [x, x] if rank == 1 else None, 1),
        "gather": lambda: m.gather(x, [empty(), empty()] if rank == 1 else None, 1),
        "muted": lambda: (m.all_gather_object([None] * 2, rank), m.broadcast_object_list([0], 0)),
        "barrier": lambda: m.barrier(),
    }
    for name in GATHERS:  # looked up when called, inside the capture
        probes[name] = lambda name=name: getattr(m, name)(x.new_empty(2 * n), x)
    for name in SCATTERS:
        probes[name] = lambda name=name: getattr(m, name)(empty(), x.repeat(2))
    if GROUP_RANKS:  # the group-rank spelling of a peer
        probes["group_dst"] = lambda: (m.send(x, group_dst=other) if rank == 1
                                       else m.recv(empty(), group_src=other))  # fmt: skip
    return probes


def _expected(label: str, rank: int, T: int) -> list[tuple]:
    """(op, nbytes, peer, api) of each call rank ``rank`` records for probe ``label``, W=2: the
    ledger's table with T = the probe tensor's bytes (T·(W-1) = T, 2T·(W-1)//W = T)."""
    other = 1 - rank
    if label in ("send", "group_dst"):  # rank 0 sends by global rank, rank 1 by group rank
        sender = 0 if label == "send" else 1
        return [("send", T, other, "send")] if rank == sender else []
    by_label = {
        "isend": [("send", T, other, "isend")],
        "batch_isend_irecv": [("send", size * T, other, "batch_isend_irecv") for size in (1, 2)],
        "all_to_all_single": [("all_to_all", T, None, "all_to_all_single")],  # 2T·(W-1)//W
        "uneven": [("all_to_all", (2, 3)[rank] * T, None, "all_to_all_single")],  # rows not home
        "all_to_all": [("all_to_all", T, None, "all_to_all")],
        "all_gather": [("all_gather", T, None, "all_gather")],
        "reduce_scatter": [("reduce_scatter", T, None, "reduce_scatter")],
        "all_reduce": [("all_reduce", T, None, "all_reduce")],
        "broadcast": [("broadcast", T // 2, None, "broadcast")],  # T·(W-1)//W
        "reduce": [("reduce", T // 2, None, "reduce")],
        "scatter": [("scatter", T, None, "scatter")] if rank == 1 else [],  # root: (W-1) chunks
        "gather": [("gather", T, None, "gather")] if rank == 0 else [],  # everyone but the root
        "muted": [],
        "barrier": [],
    }
    by_label.update({name: [("all_gather", T, None, name)] for name in GATHERS})
    by_label.update({name: [("reduce_scatter", T, None, name)] for name in SCATTERS})
    return by_label[label]


def _special_cases(rank: int, other: int, x: torch.Tensor) -> dict:
    """Phases, nesting, an exception, groups of one, P2POps made before the capture, autograd."""
    singles = [comm.new_group([0]), comm.new_group([1])]  # collective: every rank makes both
    prebuilt_buffer = torch.empty_like(x)
    prebuilt = [dist.P2POp(dist.isend, x * (rank + 1), other),
                dist.P2POp(dist.irecv, prebuilt_buffer, other)]  # fmt: skip
    with capture.traffic() as outer:
        dist.all_reduce(x.clone())  # no phase open
        with outer.phase("forward"):
            try:
                with capture.traffic() as inner, inner.phase("inner"):
                    dist.all_reduce(x.clone())
                    raise KeyError("leaves the inner capture")
            except KeyError:
                pass
            dist.all_reduce(x.clone())  # still captured by the outer one
    with capture.traffic() as alone:
        dist.all_reduce(x.clone(), group=singles[rank])  # a group of one
        dist.all_reduce(x.clone(), group=singles[other])  # a group this rank is not in
        dist.all_to_all_single(torch.empty_like(x), x, group=singles[rank])
    with capture.traffic() as early:
        wait(dist.batch_isend_irecv(prebuilt))
    return dict(outer=outer.calls, inner=inner.calls, alone=alone.calls, early=early.calls,
                early_ok=torch.equal(prebuilt_buffer, x * (other + 1)),
                autograd=_autograd(x.double().requires_grad_()))  # fmt: skip


def _autograd(x: torch.Tensor) -> dict:
    """torch.distributed.nn.functional, forward and backward: {phase: sorted (op, api, nbytes)}."""
    with capture.traffic() as seen:
        with seen.phase("forward"):
            outputs = [
                dist_autograd.all_to_all_single(x.new_empty(2 * x.numel()), x.repeat(2)),
                torch.stack(dist_autograd.all_gather(x)),
                dist_autograd.all_reduce(x),
                dist_autograd.reduce_scatter(torch.empty_like(x), [x, x]),
            ]
        with seen.phase("backward"):
            sum(y.sum() for y in outputs).backward()
    phases = {c.phase for c in seen.calls}
    return {p: sorted((c.op, c.api, c.nbytes) for c in seen.calls if c.phase == p) for p in phases}


def _ops_on_rank(rank: int, world: int, numel: int, dtype: str) -> dict:
    """Every probe through both spellings, each in its own capture and phase, then the specials."""
    warnings.simplefilter("ignore", FutureWarning)  # torch's renamed collectives warn
    x, other = torch.arange(1, numel + 1).to(getattr(torch, dtype)), 1 - rank
    results = {}
    for spelling, module in (("dist", dist), ("c10d", c10d)):
        for label, call in _probes(module, rank, other, x).items():
            with capture.traffic() as seen, seen.phase(label):
                call()
            results[(spelling, label)] = seen.calls
    return dict(probes=results, special=_special_cases(rank, other, x))


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(st.integers(1, 5), st.sampled_from(DTYPES))
def test_every_function_records_the_ledgers_bytes(numel, dtype):
    """Each function, through torch.distributed.X and distributed_c10d.X, records its ledger op
    and bytes (receives, groups of one, object collectives: nothing); phases label the calls,
    captures nest and survive exceptions; autograd through torch.distributed.nn is captured."""
    results = launch.spawn(_ops_on_rank, 2, (numel, dtype))
    T = numel * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    for rank, result in enumerate(results):
        for (spelling, label), calls in result["probes"].items():
            expected = [Call(op, nbytes, peer, label, 2, api)
                        for op, nbytes, peer, api in _expected(label, rank, T)]  # fmt: skip
            assert calls == expected, f"rank {rank}, {spelling}.{label}"
        special, D = result["special"], numel * 8  # the autograd probe runs in float64
        assert [c.phase for c in special["outer"]] == [None, "forward", "forward"]
        assert special["inner"] == [Call("all_reduce", T, None, "inner", 2, "all_reduce")]
        assert special["alone"] == []
        assert special["early"] == [Call("send", T, 1 - rank, None, 2, "batch_isend_irecv")]
        assert special["early_ok"], "a P2POp made before the capture delivered the wrong tensor"
        assert special["autograd"] == {
            "forward": [("all_gather", "all_gather", D), ("all_reduce", "all_reduce", D),
                        ("all_to_all", "all_to_all_single", D),
                        ("reduce_scatter", "reduce_scatter", D)],
            # all_gather's backward on gloo is an all-to-all made of W scatters, one rooted here
            "backward": [("all_gather", "all_gather", D), ("all_reduce", "all_reduce", D),
                         ("all_to_all", "all_to_all_single", D), ("scatter", "scatter", D)],
        }  # fmt: skip


def test_the_originals_come_back_after_nesting_and_errors():
    """Inside a capture every spelling (module aliases too) is the wrapper; after nested
    captures, one left by an exception, every original is back and P2POp checks pass."""
    names = [n for n in (*capture.RECORDED, *capture.MUTED) if hasattr(c10d, n)]
    before = {n: getattr(c10d, n) for n in names}
    try:
        with capture.traffic(), capture.traffic():
            raise KeyError("leaves both captures")
    except KeyError:
        pass
    with capture.traffic():
        with capture.traffic():
            pass
        assert all(getattr(m, n) is not before[n] for m in (dist, c10d) for n in names)
        assert SHIM is not before["all_reduce"]
        c10d._check_op(dist.isend)  # P2POp(dist.isend, ...) constructs: torch compares op identity
    assert all(getattr(m, n) is before[n] for m in (dist, c10d) for n in names)
    assert SHIM is before["all_reduce"]


def _forward_backward(attention, case, group, seen=None) -> list[torch.Tensor]:
    """out, dq, dk, dv of one case, labelled "forward" and "backward" in ``seen`` if given."""
    q, k, v, dout = case.shards(dist.get_rank(group))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    phase = seen.phase if seen else lambda name: contextlib.nullcontext()
    with phase("forward"):
        out = attention(q, k, v, **case.options(group, None))
    with phase("backward"):
        out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _on_four(rank: int, world: int, cases: list) -> dict:
    """Every case this rank is a member of (None for the others), and the sub-group calls."""
    groups = {members: comm.new_group(members) for members in GROUPS}
    methods = [_compare(case, groups[case.members]) if rank in case.members else None
               for case in cases]  # fmt: skip
    return dict(methods=methods, subgroups=_subgroups(rank, groups))


def _compare(case, group) -> dict:
    """One case without capture, then under ledger.record() and capture.traffic() at once."""
    attention = getattr(sptutor, f"{case.method}_attention")
    plain = _forward_backward(attention, case, group)
    with ledger.record() as led, capture.traffic() as seen:
        captured = _forward_backward(attention, case, group, seen)
    messages = led.messages()
    phases = [e.phase for e in messages]
    return dict(
        same=all(torch.equal(a, b) for a, b in zip(plain, captured)),
        logged=[(e.op, e.peer, e.nbytes, e.phase) for e in messages],
        seen=[(c.op, c.peer, c.nbytes, c.phase) for c in seen.calls],
        sizes={c.group_size for c in seen.calls},
        ledger_totals={p: (phases.count(p), led.bytes_sent(phase=p)) for p in phases},
        totals={p: (seen.count(p), seen.bytes_sent(p)) for p in phases},
        by_phase=seen.by_phase(),
    )


def _subgroups(rank: int, groups: dict) -> list[Call]:
    """A send and a batch on sub-groups (1, 2, 3) and (2, 3), then an all-reduce on (1, 2, 3)
    that rank 0 is outside of: peers are global ranks, group sizes the sub-group's."""
    x, triple, pair = torch.ones(3), groups[(1, 2, 3)], groups[(2, 3)]  # 12 bytes
    with capture.traffic() as seen:
        if rank == 1:
            dist.send(x, 3, group=triple)
        if rank == 3:
            dist.recv(torch.empty(3), 1, group=triple)
        if rank in (2, 3):
            other = 5 - rank
            p2p = [dist.P2POp(dist.isend, x, other, pair),
                   dist.P2POp(dist.irecv, torch.empty(3), other, pair)]  # fmt: skip
            wait(dist.batch_isend_irecv(p2p))
        dist.all_reduce(x.clone(), group=triple)
    return seen.calls


def method_cases() -> st.SearchStrategy[list]:
    """A case of ring, lss, ulysses and lasp on each group of GROUPS (W = 1..4)."""
    lists = [
        per_group(functools.partial(softmax_cases, "ring"), 1),
        per_group(functools.partial(softmax_cases, "lss"), 1),
        per_group(lambda members: ulysses_cases("ulysses", members, len(members)), 1),
        per_group(functools.partial(linear_cases, "lasp"), 1),
    ]
    return st.tuples(*lists).map(lambda per_method: [c for cases in per_method for c in cases])


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(method_cases())
def test_captured_traffic_of_the_real_methods_equals_their_ledger(cases):
    """ring, lss, ulysses and lasp (forward + backward, W = 1..4): on every rank the captured
    calls are the ledger's messages, in order (op, peer, bytes, phase), so counts and bytes per
    phase agree; capturing changes no result (bit for bit: the same ops run on the same data)."""
    results = launch.spawn(_on_four, 4, (cases,))
    for index, case in enumerate(cases):
        for rank in case.members:
            got, where = results[rank]["methods"][index], f"{case}, rank {rank}"
            assert got["same"], f"{where}: results differ under capture"
            assert got["seen"] == got["logged"], where
            assert got["sizes"] <= {len(case.members)}, where
            assert got["totals"] == got["ledger_totals"] == got["by_phase"], where
    expected = {0: [], 1: [Call("send", 12, 3, None, 3, "send")],
                2: [Call("send", 12, 3, None, 2, "batch_isend_irecv")],
                3: [Call("send", 12, 2, None, 2, "batch_isend_irecv")]}  # fmt: skip
    for rank, result in enumerate(results):
        all_reduce = [Call("all_reduce", 16, None, None, 3, "all_reduce")] if rank else []
        assert result["subgroups"] == expected[rank] + all_reduce, f"rank {rank}"  # 2·12·2//3
