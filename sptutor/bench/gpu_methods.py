"""The GPU check's method rows, run under torchrun: every method's real code against the oracle,
and the ring's overlap of messages with compute.

``python -m torch.distributed.run --standalone --nproc_per_node N -m sptutor.bench.gpu_methods
--out rows.jsonl`` (``sptutor.bench.gpu`` starts it): NCCL and one GPU per rank when CUDA is
there (``backend="auto"`` is then our Triton kernels), gloo on CPU. Each case runs on every rank,
its shards on the rank's device; rank 0 gathers the results and compares every rank's shards, its
messages and its saved-for-backward bytes with ``oracle.simulate`` on the CPU
(``sptutor.testing.compare_with_oracle``, the tests' comparison and tolerance, float32: 1e-5).
Rank 0 appends one JSON row per method to ``--out`` as it goes, so a crash keeps what was done.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import statistics
import time
import traceback

import torch
import torch.distributed as dist

import sptutor
from sptutor import backends, blocks, comm, torchrun
from sptutor.bench import common
from sptutor.mesh import make_usp_mesh
from sptutor.methods import LINEAR_METHODS, METHODS
from sptutor.testing import Case, compare_with_oracle, run_case


def degree(method: str, world: int) -> int:
    """The Ulysses degree U the heads must fit: W for ulysses, the benchmarks' U for usp
    (``bench.common.ulysses_degree``), else 1."""
    if method == "ulysses":
        return world
    return common.ulysses_degree(method, world) or 1


def method_cases(method: str, world: int, gpu: bool) -> list[Case]:
    """Two float32 cases of ``method`` on ranks 0..W-1. Softmax: zigzag causal GQA with packed
    documents (one of a single token) and an uneven S, odd D; contiguous non-causal MHA.
    Linear: causal with a per-head decay, GQA and packed documents; non-causal MHA."""
    members, split = tuple(range(world)), degree(method, world)
    per_rank = 96 if gpu else 8
    dims = (99, 64) if gpu else (5, 8)
    linear = method in LINEAR_METHODS
    seq_len = world * per_rank + (0 if linear else 1)
    cu_seqlens = (0, seq_len // 3, seq_len // 3 + 1, seq_len)
    common = dict(method=method, members=members, batch=1, dtype="float32",
                  ulysses=split if method == "usp" else None)  # fmt: skip
    if linear:
        decay = tuple(1 - 2.0 ** -(3 + h % 4) for h in range(2 * split))
        first = Case(layout="contiguous", causal=True, seq_len=seq_len, heads_q=2 * split,
                     heads_kv=split, head_dim=dims[0], seed=1, decay=decay,
                     cu_seqlens=cu_seqlens, **common)  # fmt: skip
    else:
        first = Case(layout="zigzag", causal=True, seq_len=seq_len, heads_q=2 * split,
                     heads_kv=split, head_dim=dims[0], seed=1, cu_seqlens=cu_seqlens,
                     **common)  # fmt: skip
    second = Case(layout="contiguous", causal=False, seq_len=world * per_rank,
                  heads_q=2 * split, heads_kv=2 * split, head_dim=dims[1], seed=2,
                  **common)  # fmt: skip
    return [first, second]


def gather(obj, device: torch.device) -> list:
    """Every rank's ``obj``, in rank order: ``dist.all_gather_object`` without numpy (torch's
    unpickles through ``tensor.numpy()``, and the GPU image may have no numpy)."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    world = dist.get_world_size()
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    found = []
    for part, length in zip(parts, lengths):
        raw = part.cpu().contiguous()
        found.append(pickle.loads(ctypes.string_at(raw.data_ptr(), length)))
    return found


def check_method(method: str, world: int, device: torch.device, meshes: dict) -> dict | None:
    """Run the method's cases on every rank; on rank 0 the row (None elsewhere)."""
    gpu = device.type == "cuda"
    worst, problems, cases = (-1.0, "", ""), [], method_cases(method, world, gpu)
    for case in cases:
        try:
            result = run_case(case, None, mesh=meshes.get(case.ulysses), device=device)
        except Exception as error:  # the same error on every rank (e.g. a refused argument)
            result = dict(error=f"{type(error).__name__}: {error}".splitlines()[0])
        gathered = gather(result, device)
        if dist.get_rank() != 0:
            continue
        errors = [r["error"] for r in gathered if "error" in r]
        if errors:
            problems.append(f"{case.describe()}: {errors[0]}")
            continue
        comparisons = compare_with_oracle(case, dict(enumerate(gathered)))
        for comparison in comparisons:
            problems += comparison.problems(case.torch_dtype)
            for name, error in comparison.errors.items():
                if error > worst[0]:
                    worst = (error, name, case.describe())
    if dist.get_rank() != 0:
        return None
    concrete = backends.resolve("auto", torch.zeros(1, device=device))
    if method == "rsa" or (method in LINEAR_METHODS and concrete == "fused"):
        concrete = "torch"  # rsa always; fused is for softmax blocks only
    name = f"{method} vs oracle (W={world}, {dist.get_backend()}, {concrete}, float32)"
    if problems:
        return dict(name=name, result="FAIL", figures="; ".join(problems)[:400])
    figures = (f"{len(cases)} cases, worst {worst[1]} {worst[0]:.1e} <= 1e-05; "
               "messages and saved bytes = oracle")  # fmt: skip
    return dict(name=name, result="PASS", figures=figures)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms, every rank starting together; the slowest rank's."""
    times = []
    for index in range(warmup + repeats):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return max(gather(statistics.median(times) * 1e3, device))


def overlap(world: int, device: torch.device) -> dict | None:
    """Ring attention's forward + backward per step against its compute alone (the same W block
    forwards, merges and backwards, no messages) and its messages alone (the same ring shifts)."""
    name = "ring overlap: step time vs compute alone"
    gpu = device.type == "cuda"
    if world < 2:
        why = "1 GPU" if gpu else "1 process"
        return dict(name=name, result="SKIP",
                    figures=f"not measured: needs >= 2 ranks, one GPU each ({why})")  # fmt: skip
    batch, seq, heads, dim = (1, 8192, 16, 128) if gpu else (1, 256, 2, 32)
    dtype = torch.bfloat16 if gpu else torch.float32
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    q, k, v, dout = (torch.randn(batch, seq, heads, dim, generator=generator, device=device,
                                 dtype=dtype) for _ in range(4))  # fmt: skip
    backend, scale = backends.resolve("auto", q), dim**-0.5
    pos = torch.arange(seq, device=device)

    def ring():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        sptutor.ring_attention(qq, kk, vv, backend=backend).backward(dout)

    def compute():
        acc = blocks.accumulation_dtype(dtype)
        out = torch.zeros(q.shape, dtype=acc, device=device)
        lse = torch.full((batch, heads, seq), float("-inf"), dtype=acc, device=device)
        for _ in range(world):
            block = backends.attention_forward(backend, q, k, v, pos, pos, False, scale)
            out, lse = blocks.merge(out, lse, *block)
        out = out.to(dtype)  # the ring saves its output in q's dtype
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=device) for x in (q, k, v))
        for _ in range(world):
            grads = backends.attention_backward(backend, dout, q, k, v, out, lse, pos, pos,
                                                False, scale)  # fmt: skip
            dq, dk, dv = dq + grads[0], dk + grads[1], dv + grads[2]

    def messages():
        held = [k, v]
        for step in range(world - 1):
            held = comm.ring_shift(held, None, phase="forward", step=step).wait()
        held, sums = [k, v], [torch.zeros(k.shape, dtype=torch.float32, device=device)] * 2
        for step in range(world):
            shift = comm.ring_shift(held, None, phase="backward", step=step)
            sums = comm.ring_shift(sums, None, phase="backward", step=step).wait()
            held = shift.wait()

    repeats = 5 if gpu else 3
    ring_ms, compute_ms, comm_ms = (_median_ms(fn, device, repeats) / world
                                    for fn in (ring, compute, messages))  # fmt: skip
    hidden = min(1.0, max(0.0, (compute_ms + comm_ms - ring_ms) / comm_ms)) if comm_ms else 1.0
    figures = (f"per step: ring {ring_ms:.2f} ms, compute alone {compute_ms:.2f}, messages alone "
               f"{comm_ms:.2f}; ring/compute {ring_ms / compute_ms:.2f}, {hidden:.0%} of the "
               f"messages hidden (B={batch} S/W={seq} H={heads} D={dim} "
               f"{str(dtype).removeprefix('torch.')}, W={world})")  # fmt: skip
    if not gpu:
        return dict(name=name, result="INFO", figures="CPU, gloo: says nothing of a GPU; "
                    + figures)  # fmt: skip
    goal = ring_ms <= 1.1 * compute_ms  # within 10% of its compute: the messages are hidden
    return dict(name=name, result="PASS" if goal else "BELOW", figures=figures + "; goal <= 1.1")


def main(argv: list[str] | None = None) -> int:
    """One rank of the check: the method rows, then the overlap row, appended to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON lines file rank 0 appends rows to")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--wait-for", metavar="FILE", help="start the timing once FILE exists "
                        "(the parent's own GPU work is done), or after 300 s")  # fmt: skip
    args = parser.parse_args(argv)
    torchrun.init()
    rank, world, device = dist.get_rank(), dist.get_world_size(), torchrun.device()

    def emit(row: dict | None) -> None:
        if rank == 0 and row is not None:
            with open(args.out, "a") as file:
                file.write(json.dumps(row) + "\n")

    meshes = {u: make_usp_mesh(u, world // u) for u in sorted({degree("usp", world), 1})}
    if device.type == "cuda" and world == 1:
        emit(dict(name="multi-rank NCCL untested (1 GPU)", result="SKIP",
                  figures="every method ran on W=1: no message crossed NCCL"))  # fmt: skip
    for method in args.methods.split(","):
        emit(check_method(method, world, device, meshes))
    give_up = time.monotonic() + 300
    while rank == 0 and args.wait_for and not os.path.exists(args.wait_for):
        if time.monotonic() > give_up:
            break
        time.sleep(0.2)
    dist.barrier()
    try:
        emit(overlap(world, device))
    except Exception as error:
        emit(dict(name="ring overlap: step time vs compute alone", result="ERROR",
                  figures=traceback.format_exception_only(error)[-1].strip()[:300]))  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
