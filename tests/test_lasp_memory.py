"""LASP on the torch backend: a rank's memory is O(C·D + D²), never C×C, and the bench runs."""

import subprocess
import sys

import pytest

from sptutor import cli

# One child process: it imports torch, warms every code path up on a short chunk, caps its
# address space just above what it has mapped (a C×C mistake then fails at once instead of
# swapping the machine), then runs C = 65536 and prints how far its peak RSS grew.
CHILD = r"""
import os, resource, sys, tempfile
import torch
import torch.distributed as dist
from sptutor import backends, chunks, lasp_attention

torch.set_num_threads(1)
CHUNK, CAP = int(sys.argv[1]), int(sys.argv[2])
decay = torch.tensor([0.999, 0.99])

def inputs(chunk):
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, chunk, 2, 16, generator=gen) for _ in range(2))  # B, C, Hq, D
    k, v = (torch.randn(1, chunk, 1, 16, generator=gen) for _ in range(2))  # GQA: Hkv = 1
    kv_in, dkv_out = (torch.randn(1, 2, 16, 16, generator=gen) for _ in range(2))  # (B, Hq, D, D)
    return q, k, v, dout, kv_in, dkv_out

def middle_rank(q, k, v, dout, kv_in, dkv_out):
    # what sptutor.lasp does on a rank with a neighbour on each side, torch backend
    chunk = q.shape[1]
    out, local = backends.linear_local_forward("torch", q, k, v, decay, True)
    chunks.carry(kv_in, local, decay, chunk)
    out = out + chunks.readout(q, kv_in, decay)
    dq, dk, dv, local_dstate = backends.linear_local_backward(
        "torch", dout, q, k, v, kv_in, decay, True)
    chunks.carry(dkv_out, local_dstate, decay, chunk)
    chunks.local_state_backward(dkv_out, k, v, decay)

def middle_rank_with_documents(q, k, v, dout, kv_in, dkv_out):
    # the same with three packed documents in the chunk: each segment is a chunk of its own
    chunk = q.shape[1]
    cuts = [0, chunk // 3, 2 * chunk // 3, chunk]
    parts = tuple(slice(a, b) for a, b in zip(cuts, cuts[1:]))
    out, local = backends.linear_local_forward("torch", q, k, v, decay, True, parts)
    first = parts[0]
    out[:, first] += chunks.readout(q[:, first], kv_in, decay)
    dq, dk, dv, local_dstate = backends.linear_local_backward(
        "torch", dout, q, k, v, kv_in, decay, True, parts, True)
    last = parts[-1]
    chunks.local_state_backward(dkv_out, k[:, last], v[:, last], decay)

def single_rank(q, k, v, dout, *_):
    # the real autograd function on a 1-process group: intra-chunk forward and backward
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    lasp_attention(q, k, v, decay=decay, backend="torch").backward(dout)

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

init_file = os.path.join(tempfile.mkdtemp(), "init")
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
for run in (middle_rank, middle_rank_with_documents, single_rank):
    run(*inputs(256))
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + CAP, mapped + CAP))
tensors = inputs(CHUNK)
before = peak_mib()
for run in (middle_rank, middle_rank_with_documents, single_rank):
    run(*tensors)
print(peak_mib() - before)
dist.destroy_process_group()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB and /proc: Linux only")
def test_a_rank_at_c_65536_stays_far_below_one_c_by_c_tensor():
    """Forward + backward of LASP ranks at C = 65536 (one document, or three in the chunk) grow
    peak RSS by well under 1 GiB."""
    chunk, cap = 65536, 2 * 2**30
    # old code built (Hq, C, C) decay and score tensors: 32 GiB for this shape in float32
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(chunk), str(cap)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    growth_mib = float(result.stdout.split()[-1])
    # q, k, v, dout and each gradient are 4-8 MiB here (O(C·D)); ~80 MiB observed. 512 MiB is
    # 60x one of them and 1/64 of a single C×C float32 (32 GiB): only an O(C²) tensor breaks it
    assert growth_mib < 512, f"peak RSS grew by {growth_mib:.0f} MiB at C={chunk}"


def test_bench_lasp_quick_prints_time_per_token(capsys):
    """`sptutor bench lasp --quick` times each C on CPU and prints µs per token, exit code 0."""
    assert cli.main(["bench", "lasp", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "µs/token" in printed
    assert all(f"{chunk:>6}" in printed for chunk in (4096, 16384))
