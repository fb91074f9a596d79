"""The step loops are ready for a GPU: no step reads a tensor back to the host, and the ring's
dK/dV hop travels while the next step computes. Both are measured on CPU by counting, in one
launch of 4 gloo processes: a host read (``Tensor.__bool__``, ``item``, ``tolist``, ``int``,
``float``) made from inside a method's ``_forward``/``_backward`` is what a GPU waits on (it
synchronises the stream), so every such call is recorded while the methods run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import sptutor
from sptutor import backends, comm, launch
from sptutor.mesh import make_usp_mesh
from sptutor.testing import Case

ALL = (0, 1, 2, 3)
# every method, causal, uneven shards (S = 4W + 2) and packed documents with padding-free ids:
# the cases whose skip schedule depends on documents, where any_visible reads the mask back
CASES = [
    Case("ring", ALL, "zigzag", True, 1, 18, 2, 1, 4, "float32", seed=1, cu_seqlens=(0, 5, 18)),
    Case("ring", ALL, "contiguous", True, 1, 14, 2, 2, 3, "float64", seed=2),
    Case("usp", ALL, "zigzag", True, 1, 18, 4, 2, 4, "float32", seed=3, ulysses=2,
         cu_seqlens=(0, 7, 18)),
    Case("lss", ALL, "striped", True, 1, 18, 2, 1, 4, "float32", seed=4, cu_seqlens=(0, 9, 18)),
    Case("rsa", ALL, "contiguous", True, 1, 18, 2, 1, 4, "float32", seed=5,
         cu_seqlens=(0, 3, 18)),
    Case("ulysses", ALL, "contiguous", True, 1, 18, 4, 2, 4, "float32", seed=6,
         cu_seqlens=(0, 11, 18)),
    Case("lasp", ALL, "contiguous", True, 1, 18, 2, 1, 4, "float32", seed=7, decay=(0.9, 0.8),
         cu_seqlens=(0, 6, 18)),
    Case("lasp2", ALL, "contiguous", True, 1, 18, 2, 2, 4, "float32", seed=8, decay=(0.9, 0.8),
         cu_seqlens=(0, 10, 18)),
]  # fmt: skip
HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__")
STEP_FUNCTIONS = ("_forward", "_backward")
METHOD_FILES = {f"{name}.py" for name in ("ring", "usp", "lss", "rsa", "ulysses", "lasp", "lasp2")}


def _inside_a_step() -> str | None:
    """Where the calling host read happens, if a method's step function is on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        path = Path(code.co_filename)
        if code.co_name in STEP_FUNCTIONS and path.name in METHOD_FILES and "sptutor" in path.parts:
            return f"{path.name}:{code.co_name}"
        frame = frame.f_back
    return None


def _recording_host_reads(found: list[str]):
    """Replace Tensor's host reads by ones that note each read made inside a step function."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            where = _inside_a_step()
            if where is not None:
                found.append(f"Tensor.{name} in {where}")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    return originals


def _call(case: Case, group, mesh) -> None:
    """Forward and backward of sptutor's own method on this rank's shards (backend torch: the
    one that runs on any device; the fused CPU backend never runs on a GPU)."""
    q, k, v, dout = (x.requires_grad_() for x in case.shards(dist.get_rank(group)))
    options = case.options(group, mesh) | {"backend": "torch"}
    getattr(sptutor, f"{case.method}_attention")(q, k, v, **options).backward(dout.detach())


def _host_reads(rank: int, world: int) -> dict[str, list[str]]:
    """Body of each process: every case called once (its agreement check cached), then again
    while host reads are recorded. Returns, per case, the reads made inside step functions."""
    found = {}
    for case in CASES:
        mesh = make_usp_mesh(case.ulysses, world // case.ulysses) if case.method == "usp" else None
        _call(case, None, mesh)
        reads: list[str] = []
        originals = _recording_host_reads(reads)
        try:
            _call(case, None, mesh)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        found[case.describe()] = reads
    return found


def _ring_backward_order(rank: int, world: int) -> list[tuple]:
    """Body of each process: ring backward, logging block-gradient computes and the waits the
    progress hook hears, in the order they happen on this rank."""
    case = Case("ring", ALL, "zigzag", False, 1, 16, 2, 1, 4, "float64", seed=9)
    q, k, v, dout = (x.requires_grad_() for x in case.shards(rank))
    out = sptutor.ring_attention(q, k, v, **case.options(None, None))
    events = []
    original = backends.attention_backward

    def logged(*args, **kwargs):
        events.append(("compute",))
        return original(*args, **kwargs)

    backends.attention_backward = logged
    comm.set_progress_hook(lambda event, op, peer, phase, step: events.append((event, op, step)))
    try:
        out.backward(dout.detach())
    finally:
        comm.set_progress_hook(None)
        backends.attention_backward = original
    return events


def _both(rank: int, world: int) -> tuple:
    return _host_reads(rank, world), _ring_backward_order(rank, world)


def test_step_loops_read_nothing_back_and_the_dkv_hop_overlaps_the_next_compute():
    """(1) No method reads a tensor back to the host inside its step functions (their skip
    schedules are decided on the host before the first message). (2) Ring backward, W=4, no
    mask: at step s >= 1 the rank computes its block gradients before it waits for the dK, dV
    accumulators sent at step s-1 (the later waits labelled s-1: the earlier are the K, V
    shift's, waited at the end of step s-1), so the hop travels during that compute."""
    results = launch.spawn(_both, len(ALL))
    for rank, (reads, _) in enumerate(results):
        assert reads == {case.describe(): [] for case in CASES}, f"rank {rank}: {reads}"
    for rank, (_, events) in enumerate(results):
        computes = [i for i, e in enumerate(events) if e == ("compute",)]
        assert len(computes) == len(ALL), events  # no mask: every step computes one block
        for step in range(1, len(ALL)):
            waits = [i for i, e in enumerate(events) if e[0] == "enter" and e[2] == step - 1
                     and e[1] == "recv"]  # fmt: skip
            # gloo: one receive per tensor, K and V's shift's two, then the dK, dV hop's two
            assert len(waits) == 4, (step, events)
            assert waits[1] < computes[step] < waits[2], (rank, step, events)
