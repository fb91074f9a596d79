"""Adapter for yunchang's USP (``LongContextAttention``: Ulysses all-to-all x ring attention).

yunchang 0.6.4 (https://github.com/feifeibear/long-context-attention), as ``sptutor.testing.check``
calls it: ``attention(q, k, v, causal=...)`` on every rank with this rank's shards.

- layout "bshd": q (B, S/W, Hq, D), k, v (B, S/W, Hkv, D); needs Hq % U == 0 and Hkv % U == 0.
- returns out only (``LongContextAttention`` drops the LSE of its ring).
- groups: yunchang reads two globals, ``PROCESS_GROUP.ULYSSES_PG`` and ``.RING_PG``; ``setup``
  builds them over the case's ranks (``rank = ring_index * U + ulysses_index``, as
  ``set_seq_parallel_pg(use_ulysses_low=True)`` does) instead of calling ``set_seq_parallel_pg``,
  which builds them over the whole launch.
- tokens: ring_impl_type "basic" wants sptutor's contiguous layout, "zigzag" zigzag, "strip"
  striped, each over the R = W/U ring ranks then split contiguously over U (sptutor's USP rule).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from yunchang import LongContextAttention
from yunchang.globals import HAS_FLASH_ATTN, PROCESS_GROUP
from yunchang.kernels import AttnType
from yunchang.ring.utils import RingComm


def use_cpu_workarounds() -> None:
    """CPU (gloo) workarounds, the only ones yunchang needs.

    - Its flash-attn path (attn_type "fa") calls two CUDA kernels per ring step: point it at exact
      torch versions with flash-attn's signatures. (Its own CPU path, attn_type "torch_math", is
      broken in 0.6.4: the block LSE it returns is zeros, so a ring of R > 1 averages its blocks,
      and its backward raises.)
    - Its ring backward sends dk, dv on once more after the last step, to itself on a ring of
      one (R = 1); gloo cannot send to itself, so a ring of one hands the tensor over locally.
    """
    import yunchang.kernels as kernels  # select_flash_attn_impl looks these two names up here

    kernels.flash_attn_forward = _block_forward
    kernels.flash_attn_backward = _block_backward
    send_recv, commit = RingComm.send_recv, RingComm.commit

    def send_recv_to_self(self, to_send, recv_tensor=None):
        if self.world_size > 1:
            return send_recv(self, to_send, recv_tensor)
        return to_send.clone() if recv_tensor is None else recv_tensor.copy_(to_send)

    def commit_nothing_to_self(self):
        if self.world_size > 1:
            return commit(self)
        self._reqs = []

    RingComm.send_recv, RingComm.commit = send_recv_to_self, commit_nothing_to_self


def _scores_and_mask(q, k, causal, scale):
    """Scaled scores (B, Hq, S_q, S_k) over K heads repeated to Hq, and flash-attn's causal mask:
    aligned bottom-right, query i sees keys j <= i + S_k - S_q."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (B, S_k, Hq, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, Hq, S_q, S_k)
    S_q, S_k = q.shape[1], k.shape[1]
    hidden = torch.ones(S_q, S_k, dtype=torch.bool).triu(S_k - S_q + 1) if causal else None
    return scores, hidden


def _block_forward(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=None, alibi_slopes=None, return_softmax=False,
):  # fmt: skip
    """flash-attn's block forward: out (B, S_q, Hq, D) and lse (B, Hq, S_q) of q against k, v."""
    assert dropout_p == 0 and tuple(window_size) == (-1, -1), "no dropout, no window"
    assert not softcap and alibi_slopes is None, "no softcap, no ALiBi"
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores, hidden = _scores_and_mask(q, k, causal, scale)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, S_q)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)  # (B, S_k, Hq, D)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v)
    return out, lse


def _block_backward(
    dout, q, k, v, out, softmax_lse, dq_buffer, dk_buffer, dv_buffer, dropout_p, softmax_scale,
    causal, window_size, softcap, alibi_slopes, deterministic, rng_state=None,
):  # fmt: skip
    """flash-attn's block backward: this block's dq, dk, dv, written into the buffers, from the
    final out and lse (P = exp(s - lse), dS = P * (dP - rowsum(dout * out)))."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores, hidden = _scores_and_mask(q, k, causal, scale)
    probs = torch.exp(scores - softmax_lse[..., None].to(scores))  # (B, Hq, S_q, S_k)
    if hidden is not None:
        probs = probs.masked_fill(hidden, 0.0)
    group = q.shape[2] // k.shape[2]
    v_heads = v.repeat_interleave(group, dim=2)  # (B, S_k, Hq, D)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_heads)
    row_dot = (dout * out).sum(-1).transpose(1, 2)  # (B, Hq, S_q)
    dscores = probs * (dprobs - row_dot[..., None]) * scale
    k_heads = k.repeat_interleave(group, dim=2)
    dq_buffer.copy_(torch.einsum("bhqk,bkhd->bqhd", dscores, k_heads))

    def to_kv_heads(grad):  # (B, S_k, Hq, D) -> (B, S_k, Hkv, D): sum each K/V head's queries
        return grad.unflatten(2, (k.shape[2], group)).sum(3)

    dk_buffer.copy_(to_kv_heads(torch.einsum("bhqk,bqhd->bkhd", dscores, q)))
    dv_buffer.copy_(to_kv_heads(torch.einsum("bhqk,bqhd->bkhd", probs, dout)))


_groups: dict[tuple[tuple[int, ...], int], tuple] = {}


def setup(ctx) -> dict:
    """Set yunchang's two groups for this case: rank = ring_index * U + ulysses_index.

    Every process of the launch makes every group of the case, in the same order (torch names
    groups by a counter that must agree across processes); a process keeps its own two.
    """
    members, ulysses = ctx.members, ctx.case.ulysses
    if (members, ulysses) not in _groups:
        rows = [members[i : i + ulysses] for i in range(0, len(members), ulysses)]
        columns = [members[j::ulysses] for j in range(ulysses)]
        made = {ranks: dist.new_group(list(ranks)) for ranks in rows + columns}
        _groups[members, ulysses] = made
    if ctx.rank is None:
        return {}
    ring_index, ulysses_index = divmod(ctx.rank, ulysses)
    made = _groups[members, ulysses]
    PROCESS_GROUP.ULYSSES_PG = made[members[ring_index * ulysses : (ring_index + 1) * ulysses]]
    PROCESS_GROUP.RING_PG = made[members[ulysses_index::ulysses]]
    return {}


def attention(q, k, v, *, causal: bool, ring_impl_type: str = "basic", attn_type: str = "fa"):
    """q: (B, S/W, Hq, D), k, v: (B, S/W, Hkv, D) this rank's shards -> out (B, S/W, Hq, D)."""
    layer = LongContextAttention(ring_impl_type=ring_impl_type, attn_type=AttnType(attn_type))
    return layer(q, k, v, causal=causal)


if not HAS_FLASH_ATTN:
    use_cpu_workarounds()

ADAPTER = dict(
    method="usp",
    tensor_layout="bshd",
    causal_keyword="causal",
    group_keyword=None,  # yunchang reads its groups from PROCESS_GROUP, set by setup
    returns="out",
    positions=None,  # sptutor's own layouts (see CONFIGS for which ring_impl_type takes which)
    setup=setup,
    kwargs={},
)

# What every check of yunchang draws: Ulysses needs Hq % U == 0 and Hkv % U == 0 (4 K/V heads
# split over U = 1, 2, 4).
SWEEP = dict(heads_kv=(4,), gqa=(1, 2))

# What is worth checking: check() options per configuration, merged over ADAPTER and SWEEP
# (kwargs merged into ADAPTER's). float64 is left out where yunchang's ring backward aborts the
# launch with it (causal, R > 1: one rank sends dk, dv as float32, its neighbour waits for
# float64; gloo kills the process).
CONFIGS = [
    dict(name="basic", layouts=("contiguous",), causal=(False, True), dtypes=("float32",)),
    dict(name="zigzag", layouts=("zigzag",), causal=(True,), dtypes=("float32", "float64"),
         kwargs=dict(ring_impl_type="zigzag")),
    dict(name="strip", layouts=("striped",), causal=(True,), dtypes=("float32",),
         kwargs=dict(ring_impl_type="strip")),
    # yunchang's own CPU path, as shipped (no backward)
    dict(name="torch_math", layouts=("contiguous",), causal=(False, True), dtypes=("float32",),
         backward=False, kwargs=dict(attn_type="torch_math")),
]  # fmt: skip
