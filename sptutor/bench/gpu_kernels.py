"""The GPU check's kernel rows: the Triton kernels against the ground truth, in each dtype.

Plain functions, no pytest (the GPU image has none): each returns ``(name, ok, error, limit)``
with the worst tensor's relative error and the bar it had to clear (``sptutor.tolerances``).
Compiled on a GPU at shapes of ~1000 tokens (several tiles of every size, partial last tiles);
under the Triton interpreter on a CPU at ~40 tokens (16 x 16 tiles), as tests/test_kernels.py.

Tolerances, per dtype (the design's rule, ``sptutor.tolerances``):

- float32: ``TOLERANCE[float32]`` = 1e-5 relative to the float64 truth. The kernels use exact
  fp32 products (``input_precision="ieee"``); ``sptutor.blocks`` run in float32 at these GPU
  shapes (S ~ 1000, D 64..128) measured 4e-7..6e-7 on out, dq, dk, dv: 20x headroom, while a
  wrong mask or a missed tile gives 1e-2 or more.
- float16, bfloat16: no fixed number is honest (it depends on S, D and the data), so each
  tensor must be within 2x (3x for gradients) the error of plain torch attention run in the
  same dtype against the same float64 truth (``baseline_limit``), as the tests judge fp16.
"""

from __future__ import annotations

import functools
import math

import torch

from sptutor import chunks, layout
from sptutor.oracle import reference
from sptutor.tolerances import TOLERANCE, baseline_limit, relative_error

Result = tuple[str, bool, float, float]  # (name, ok, worst error, its limit)
NAMES = ("out", "lse", "dq", "dk", "dv")


def _tensors(seed: int, *shapes: tuple[int, ...], scale: float = 1.0) -> list[torch.Tensor]:
    """Seeded standard-normal float64 tensors (times ``scale``), drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=generator, dtype=torch.float64) * scale for s in shapes]


def _ratio(error: float, limit: float) -> float:
    """error / limit; infinite when either is not finite (NaN, an overflowed baseline)."""
    if not (math.isfinite(error) and math.isfinite(limit)):
        return math.inf
    if limit == 0:
        return 0.0 if error == 0 else math.inf
    return error / limit


def judge(name: str, got, truth, baseline, dtype: torch.dtype) -> Result:
    """The worst of ``got``'s tensors against ``truth`` (dicts by tensor name), by the rule for
    ``dtype``: fixed in float32/float64, ``factor x`` the baseline's error in 16 bits. A tensor
    whose error is not finite, or whose 16-bit baseline overflowed, fails."""
    worst = (-1.0, 0.0, 0.0, "")
    for key, value in got.items():
        error = relative_error(value, truth[key])
        if dtype in TOLERANCE:
            limit = TOLERANCE[dtype]
        else:
            kind = "output" if key in ("out", "lse") else "gradient"
            limit = baseline_limit(baseline[key], truth[key], kind)
        ratio = _ratio(error, limit)
        if ratio > worst[0]:
            worst = (ratio, error, limit, key)
    ratio, error, limit, key = worst
    return f"{name} [{key}]", ratio <= 1.0, error, limit


def _with_grads(fn, q, k, v, dout, **options):
    """out (and lse, if ``fn`` returns it) and dq, dk, dv of ``fn`` by autograd."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    result = fn(q, k, v, **options)
    out, lse = result if isinstance(result, tuple) else (result, None)
    out.backward(dout)
    found = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    if lse is not None:
        found["lse"] = lse.detach()
    return found


def flash_cases(gpu: bool) -> list[dict]:
    """The softmax shapes: non-causal MHA; causal GQA on zigzag positions (a ring rank's
    block); packed documents (a one-token document, edges on and off tiles); odd D, MQA."""
    seq = 1000 if gpu else 40  # not a multiple of any tile: partial last tiles
    dims = (64, 128, 64, 99) if gpu else (16, 24, 16, 5)
    zigzag = layout.positions(2 * seq, world=2, rank=1, layout="zigzag")
    cu = torch.tensor([0, seq // 4, seq // 4 + 1, seq // 2, seq - 7, seq])
    return [
        dict(name=f"non-causal MHA D={dims[0]}", shape=(2, seq, 4, 4, dims[0])),
        dict(name=f"causal GQA zigzag D={dims[1]}", shape=(1, seq, 8, 2, dims[1]),
             causal=True, q_pos=zigzag, k_pos=zigzag),
        dict(name=f"causal packed documents D={dims[2]}", shape=(1, seq, 4, 2, dims[2]),
             causal=True, cu_seqlens=cu),
        dict(name=f"non-causal MQA odd D={dims[3]}", shape=(1, seq, 3, 1, dims[3])),
    ]  # fmt: skip


def check_flash(case: dict, dtype: torch.dtype, device: str, seed: int = 0) -> Result:
    """flash_attention_forward/backward in ``dtype`` on ``device`` against full attention in
    float64 (gradients by autograd); 16-bit against plain attention in ``dtype``."""
    from sptutor import kernels

    batch, seq, heads_q, heads_kv, head_dim = case["shape"]
    q_shape, kv_shape = (batch, seq, heads_q, head_dim), (batch, seq, heads_kv, head_dim)
    q, k, v, dout = (x.to(device) for x in _tensors(seed, q_shape, kv_shape, kv_shape, q_shape))
    causal, cu = case.get("causal", False), case.get("cu_seqlens")
    positions = dict(q_pos=case.get("q_pos"), k_pos=case.get("k_pos"))
    truth_options = dict(causal=causal, cu_seqlens=cu, **positions)
    truth = _with_grads(reference.full_attention, q, k, v, dout, **truth_options)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    baseline = None
    if dtype not in TOLERANCE:
        baseline = _with_grads(reference.full_attention, *low, **truth_options)
    documents = {}
    if cu is not None:
        ids = layout.document_ids(cu, torch.arange(seq))
        documents = dict(q_doc=ids.to(device), k_doc=ids.to(device))
    options = dict(causal=causal, **positions, **documents)
    out, lse = kernels.flash_attention_forward(*low[:3], **options)
    grads = kernels.flash_attention_backward(low[3], *low[:3], out, lse, **options)
    got = dict(zip(NAMES, (out, lse, *grads)))
    return judge(f"flash {case['name']}", got, truth, baseline, dtype)


def _linear_truth(q, k, v, dout, causal: bool, decay, prefix: int):
    """out, dq, dk, dv of the tokens after ``prefix`` by autograd of full linear attention."""
    found = _with_grads(reference.full_linear_attention, q, k, v, dout, causal=causal,
                        decay=decay)  # fmt: skip
    return {key: value[:, prefix:] for key, value in found.items()}


def check_linear(causal: bool, dtype: torch.dtype, device: str, gpu: bool, seed: int = 1) -> Result:
    """linear_attention_forward/backward on one chunk in ``dtype``. Causal: a per-head decay and
    the state after a prefix (as LASP hands it on, float32), against full linear attention over
    the whole sequence in float64; non-causal: no state (queries see the whole chunk)."""
    from sptutor import kernels

    prefix, length = ((128, 384) if gpu else (16, 40)) if causal else (0, 256 if gpu else 40)
    batch, heads_q, heads_kv, head_dim = (2, 4, 2, 64) if gpu else (1, 4, 2, 24)
    total = prefix + length
    q_shape, kv_shape = (batch, total, heads_q, head_dim), (batch, total, heads_kv, head_dim)
    # x 0.5: scores ~ N(0, D/16), so the unnormalised sums stay well inside float16
    q, k, v, dout = (x.to(device) for x in
                     _tensors(seed, q_shape, kv_shape, kv_shape, q_shape, scale=0.5))  # fmt: skip
    decay = None
    if causal:  # 1 - 2^-n: exact in every dtype, so the truth and the kernel see one decay
        rates = [1 - 2.0 ** -(4 + h % 4) for h in range(heads_q)]
        decay = torch.tensor(rates, dtype=torch.float64, device=device)
    truth = _linear_truth(q, k, v, dout, causal, decay, prefix)
    baseline = None
    if dtype not in TOLERANCE:
        low = [x.to(dtype) for x in (q, k, v, dout)]
        baseline = _linear_truth(*low, causal, None if decay is None else decay.to(dtype), prefix)
    state = None
    if prefix:
        piece = slice(0, prefix)
        state = chunks.forward(q[:, piece], k[:, piece], v[:, piece], None, decay)[1].float()
    chunk = [x[:, prefix:].to(dtype) for x in (q, k, v, dout)]
    options = dict(state=state, decay=None if decay is None else decay.to(dtype), causal=causal)
    out, _ = kernels.linear_attention_forward(*chunk[:3], **options)
    dq, dk, dv, _ = kernels.linear_attention_backward(chunk[3], *chunk[:3], **options)
    got = dict(out=out, dq=dq, dk=dk, dv=dv)
    what = "causal, decay, state in" if causal else "non-causal"
    return judge(f"linear {what} D={head_dim}", got, truth, baseline, dtype)


def all_checks(dtypes: tuple[torch.dtype, ...], device: str, gpu: bool) -> list:
    """Every kernel check for every dtype: a list of ``(dtype, what, thunk)``, each thunk giving
    a :data:`Result` (run them one by one, so one failure does not stop the rest)."""
    found = []
    for dtype in dtypes:
        for case in flash_cases(gpu):
            thunk = functools.partial(check_flash, case, dtype, device)
            found.append((dtype, f"flash {case['name']}", thunk))
        for causal in (True, False):
            thunk = functools.partial(check_linear, causal, dtype, device, gpu)
            found.append((dtype, f"linear {'causal' if causal else 'non-causal'}", thunk))
    return found
