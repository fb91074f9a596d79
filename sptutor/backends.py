"""Where block attention is computed: plain torch (``sptutor.blocks`` for softmax blocks,
``sptutor.chunks`` for linear chunks), torch's fused CPU flash kernel (``sptutor.fused``) or our
Triton kernels.

``backend="auto"`` is ``"triton"`` for CUDA tensors when the optional triton package is installed
(the ``kernels`` extra), ``"fused"`` for CPU tensors, and ``"torch"`` otherwise (see Design,
*Public API*). ``"torch"`` is the readable block math the oracle runs (slower; ask for it to step
through or compare with the oracle). ``"fused"`` runs softmax blocks on
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, CPU tensors only; it has no
linear kernels, so linear chunks run on torch there. ``"triton"`` also runs on CPU tensors, under
the Triton interpreter (slow: for tests and reading; ``sptutor.kernels`` turns the interpreter on
when there is no GPU). All backends take and return the same shapes and dtypes (partial results in
the accumulation dtype), so a method's step loop does not care which one runs. RSA always
computes on torch: its full score rows are the point.
"""

from __future__ import annotations

import importlib.util

import torch

from sptutor import agreement, blocks, chunks, comm, fused
from sptutor import layout as layout_module
from sptutor.layout import all_positions

BACKENDS = ("auto", "torch", "fused", "triton")


def _kernels():
    """sptutor.kernels, imported on first use: "torch" users never import triton."""
    from sptutor import kernels

    return kernels


def triton_installed() -> bool:
    """Is the optional ``triton`` package there (``pip install "sptutor[kernels]"``)?"""
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str, like: torch.Tensor) -> str:
    """The concrete backend for tensors like ``like``; ValueError if unknown or unavailable.

    ``"auto"`` is ``"triton"`` on CUDA tensors when triton is installed, ``"fused"`` on CPU
    tensors, else ``"torch"``. ``"fused"`` needs CPU tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if like.is_cuda and triton_installed():
            return "triton"
        return "fused" if like.device.type == "cpu" else "torch"
    if backend == "fused" and like.device.type != "cpu":
        raise ValueError(
            f"backend='fused' runs torch's CPU flash-attention kernel and needs CPU tensors, got "
            f"{like.device} ones; use backend='auto' (triton on CUDA) or 'torch'"
        )
    if backend == "triton":
        if not triton_installed():
            raise ValueError(
                "backend='triton' needs the triton package, which sptutor's kernels extra "
                'installs: pip install "sptutor[kernels]" (or pip install -e ".[kernels]")'
            )
        interpreted = _kernels().INTERPRETED
        if not (like.is_cuda or interpreted):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
                "(set before sptutor.kernels is imported)"
            )
    return backend


def prepare(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    group,
    causal: bool,
    layout: str,
    backend: str,
    scale: float | None,
    ulysses: int = 1,
    return_lse: bool = False,
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[list[bool]], str, float]:
    """What a softmax method derives from its arguments before its first message.

    q: (B, S_r, Hq, D), k: (B, S_r, Hkv, D) this rank's shards, already checked locally.
    ``seq_len`` / ``cu_seqlens`` (N+1,) say the global S (see :func:`sequence_length`). Checks
    this process is in ``group`` and that every rank of it made the same call
    (``sptutor.agreement``, once per signature, not logged). Returns every rank's positions
    (W x (S_r,), layout sizes checked), every rank's document ids (W x (S_r,); W x None without
    ``cu_seqlens``), both on q's device; the W x W table of which blocks each rank's queries see
    (``blocks.visible_blocks``), decided here on the host from CPU positions so that the step
    loops never wait on the device to learn it; the concrete backend and the scale (default
    D ** -0.5).
    """
    agreement.check_membership(group, method)
    concrete = resolve(backend, q)
    positions, documents = place(method, q, k, group=group, layout=layout, ulysses=ulysses,
                                 seq_len=seq_len, cu_seqlens=cu_seqlens, device="cpu",
                                 causal=causal, scale=scale, return_lse=return_lse)  # fmt: skip
    visible = blocks.visible_blocks(positions, documents, causal)
    positions = [p.to(q.device) for p in positions]
    documents = [None if d is None else d.to(q.device) for d in documents]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return positions, documents, visible, concrete, scale


def place(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    group,
    layout: str,
    ulysses: int,
    seq_len: int | None,
    cu_seqlens: torch.Tensor | None,
    device,
    **arguments,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Where every rank's tokens sit, agreed by every rank of ``group`` before any message.

    q: (B, S_r, Hq, D), k: (B, S_r, Hkv, D) this rank's shards; ``arguments`` the method's other
    keywords, for the agreement check (``sptutor.agreement``: S and ``cu_seqlens`` are in its
    signature, so every rank's changes when S does). The sizes are checked after it, so that
    every rank raises the same sentence. Returns every rank's positions W x (S_i,) and document
    ids W x (S_i,) (W x None without ``cu_seqlens``), on ``device``.
    """
    rank, world = comm.rank_and_size(group)
    layout_module.check_layout_name(layout)
    total = sequence_length(q.shape[1], world, seq_len, cu_seqlens)
    call = agreement.signature(method, q, k, layout=layout, ulysses=ulysses, S=total,
                               cu_seqlens=cu_seqlens, **arguments)  # fmt: skip
    agreement.check_ranks_agree(group, call, tokens_by_layout(world, layout, ulysses))
    positions = all_positions(total, world=world, layout=layout, ulysses=ulysses, device=device)
    if q.shape[1] != len(positions[rank]):  # the agreement check is off, or W = 1
        raise ValueError(
            f"rank {rank} holds {q.shape[1]} tokens, but the {layout} layout of S={total} over "
            f"W={world} ranks gives it {len(positions[rank])}"
            + ("" if seq_len is not None or cu_seqlens is not None else
               "; when W does not divide S, pass seq_len=S (or cu_seqlens)")
        )  # fmt: skip
    documents = [None] * world  # one document: masks from positions alone
    if cu_seqlens is not None:
        documents = [layout_module.document_ids(cu_seqlens, p) for p in positions]
    return positions, documents


def sequence_length(
    tokens: int, world: int, seq_len: int | None, cu_seqlens: torch.Tensor | None
) -> int:
    """The global S this rank's call describes (this rank holds ``tokens`` of it).

    S is ``cu_seqlens[-1]`` with packed documents, else ``seq_len``, else ``W * tokens`` (equal
    shards). A shard cannot tell S alone when W does not divide S (the last of 4 ranks holds
    3 tokens for S = 12, 13, 14 or 15), so uneven shards need ``seq_len`` or ``cu_seqlens``;
    the ranks' agreement check then names a rank that assumed otherwise. TypeError or
    ValueError for a bad ``seq_len`` or ``cu_seqlens``.
    """
    if cu_seqlens is not None:
        layout_module.check_cu_seqlens(cu_seqlens, None)
        total = int(cu_seqlens[-1])
        if seq_len is not None and seq_len != total:
            raise ValueError(f"seq_len={seq_len} but cu_seqlens ends at S={total}")
        return total
    if seq_len is None:
        return tokens * world
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__}")
    return seq_len


def tokens_by_layout(world: int, layout: str, ulysses: int = 1):
    """``S -> [tokens of each rank]`` under ``layout`` (ValueError for an S it cannot cut)."""

    def tokens(seq_len: int) -> list[int]:
        cut = all_positions(seq_len, world=world, layout=layout, ulysses=ulysses)
        return [len(p) for p in cut]

    return tokens


def attention_forward(
    backend: str, q, k, v, q_pos, k_pos, causal: bool, scale: float, q_doc=None, k_doc=None
):
    """One block forward: see ``blocks.attention_block`` for shapes (out, lse accumulate)."""
    if backend == "triton":
        return _kernels().flash_attention_forward(
            q, k, v, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, causal=causal,
            scale=scale, out_dtype=blocks.accumulation_dtype(q.dtype),
        )  # fmt: skip
    if backend == "fused":
        return fused.attention_forward(q, k, v, q_pos, k_pos, causal, scale, q_doc, k_doc)
    return blocks.attention_block(q, k, v, q_pos, k_pos, causal, scale, q_doc, k_doc)


def attention_backward(
    backend: str, dout, q, k, v, out, lse, q_pos, k_pos, causal: bool, scale: float,
    q_doc=None, k_doc=None,
):  # fmt: skip
    """One block backward: see ``blocks.attention_block_backward`` for shapes."""
    if backend == "triton":
        return _kernels().flash_attention_backward(
            dout, q, k, v, out, lse, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc,
            causal=causal, scale=scale, grad_dtype=blocks.accumulation_dtype(q.dtype),
        )  # fmt: skip
    if backend == "fused":
        return fused.attention_backward(
            dout, q, k, v, out, lse, q_pos, k_pos, causal, scale, q_doc, k_doc
        )
    return blocks.attention_block_backward(
        dout, q, k, v, out, lse, q_pos, k_pos, causal, scale, q_doc, k_doc
    )


def linear_local_forward(backend: str, q, k, v, decay, needs_state: bool, segments=None):
    """A chunk's work that waits for nobody (LASP): the intra-chunk output ``[(QK^T)⊙M]V``
    (B, C, Hq, D) and, if ``needs_state``, its local state ``sum_i decay^(C-1-i) k_i^T v_i``
    (B, Hq, D, D) — on triton one fused kernel (the chunk with no incoming state), on torch in
    sub-chunks of ``chunks.SUB_CHUNK`` tokens (memory O(C·D + D²), time linear in C).

    ``segments``: the chunk's runs of one document (slices, in order; default the whole chunk,
    see ``sptutor.chain``): each is a chunk of its own, and the local state is the last one's."""
    segments = segments or (slice(0, q.shape[1]),)
    outs, local = [], None
    for n, part in enumerate(segments):
        needed = needs_state and n == len(segments) - 1  # the outgoing state is the last one's
        out, local = _segment_forward(backend, q[:, part], k[:, part], v[:, part], decay, needed)
        outs.append(out)  # (B, C_s, Hq, D)
    return _join(outs), local


def _segment_forward(backend: str, q, k, v, decay, needs_state: bool):
    """:func:`linear_local_forward` of one segment of one document (shapes as there)."""
    if backend == "triton":
        acc = blocks.accumulation_dtype(q.dtype)
        out, local = _kernels().linear_attention_forward(q, k, v, decay=decay, out_dtype=acc)
        return out, local if needs_state else None
    out = chunks.intra_blocked(q, k, v, decay)
    local = chunks.local_state(k, v, decay, heads_q=q.shape[2]) if needs_state else None
    return out, local


def linear_local_backward(
    backend: str, dout, q, k, v, state_in, decay, needs_dstate: bool, segments=None, reads=True
):
    """Gradients that wait for nobody: intra-chunk dq, dk, dv, dq through the cached
    ``state_in`` (or None), and if ``needs_dstate`` the local ``sum_i decay^(i+1) q_i^T dO_i``.
    Returns dq: (B, C, Hq, D), dk, dv: (B, C, Hkv, D), local_dstate: (B, Hq, D, D) or None.
    On torch the intra part runs in sub-chunks, as forward.

    ``segments`` as in :func:`linear_local_forward`: ``state_in`` is the first one's, and so is
    the local dKV (i runs over its tokens) if it ``reads`` the incoming state; a chunk whose
    first token starts a document never saw that state, so its local dKV is zero."""
    segments = segments or (slice(0, q.shape[1]),)
    grads = []
    for n, part in enumerate(segments):  # only the first segment ever reads state_in
        grads.append(_segment_backward(
            backend, dout[:, part], q[:, part], k[:, part], v[:, part],
            state_in if n == 0 else None, decay, needs_dstate and n == 0 and reads,
        ))  # fmt: skip
    dq, dk, dv = (_join([g[n] for g in grads]) for n in range(3))
    local_dstate = grads[0][3]
    if needs_dstate and not reads:  # nothing of this chunk read the state: no gradient flows
        batch, _, heads_q, head_dim = q.shape
        acc = blocks.accumulation_dtype(q.dtype)
        local_dstate = q.new_zeros((batch, heads_q, head_dim, head_dim), dtype=acc)
    return dq, dk, dv, local_dstate


def _segment_backward(backend: str, dout, q, k, v, state_in, decay, needs_dstate: bool):
    """:func:`linear_local_backward` of one segment of one document (shapes as there)."""
    if backend == "triton":  # dstate_out=None: the later chunks' dKV is added when it arrives
        dq, dk, dv, local_dstate = _kernels().linear_attention_backward(
            dout, q, k, v, state=state_in, decay=decay,
            grad_dtype=blocks.accumulation_dtype(q.dtype),
        )  # fmt: skip
        return dq, dk, dv, local_dstate if needs_dstate else None
    dq, dk, dv = chunks.intra_backward_blocked(dout, q, k, v, decay)
    if state_in is not None:  # the state read in forward is cached: no message needed
        dq = dq + chunks.readout_backward(dout, state_in, decay)
    local_dstate = chunks.local_dstate(q, dout, decay) if needs_dstate else None
    return dq, dk, dv, local_dstate


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Segments' (B, C_s, H, D) results back into the chunk's (B, C, H, D), no copy for one."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
