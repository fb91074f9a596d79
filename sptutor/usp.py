"""USP (unified sequence parallelism) on ``torch.distributed``: Ulysses along the rows of a 2-D
mesh, ring along the columns.

The W = U·R ranks form a mesh (USP Alg. 1, ``sptutor.mesh.make_usp_mesh``): ulysses groups are
contiguous ranks ``[i·U, ..., i·U + U - 1]`` (one per ring index i), ring groups are strided ranks
``j, j + U, j + 2U, ...`` (one per ulysses index j), so ``rank = ring_index·U + ulysses_index``.

Forward: inside this rank's ulysses group, all-to-alls of q, k, v turn sequence into heads: every
rank of group i now holds its ring rank's T_i tokens (positions and document ids: the
concatenation of the group's) on H/U heads. Ring attention over the ring group then runs on those
tokens and heads, and one more all-to-all sends ``out`` back (heads -> sequence). Backward mirrors
it: all-to-all of dout, the ring backward, all-to-alls of dq, dk, dv.

Uneven shards: the ulysses group's all-to-alls pad its U shards to their largest, ``L_i =
ceil(T_i/U)``, and drop the padding after (``sptutor.padding``); the ring passes blocks of T_i
tokens, which differ by a token when R does not divide S (see ``oracle/usp.py``).

Nothing is written twice: the all-to-all steps are ``sptutor/ulysses.py``'s and the ring steps
are ``sptutor/ring.py``'s ``_forward``/``_backward``, run on the mesh's two groups. So U = 1 is
ring attention and U = W is Ulysses, message for message.

Mirrors ``oracle/usp.py`` step for step; here each process is one rank.
"""

from __future__ import annotations

import torch

from sptutor import backends, comm, heads, ring, ulysses
from sptutor.mesh import UspMesh, check_mesh_sizes


def _group_sizes(positions, mesh):
    """The U shard lengths of this rank's ulysses group (ring index i = its ring-group rank)."""
    ring_index, _ = comm.rank_and_size(mesh.ring_group)
    return heads.group_sizes(positions, mesh.ulysses)[ring_index]


def _forward(q, k, v, positions, documents, visible, causal, scale, mesh, backend):
    """q: (B, S_r, Hq, D); k, v: (B, S_r, Hkv, D); positions: W x (S_j,), every mesh rank's;
    documents: W x (S_j,) document ids, or W x None; visible: R bools, whether this rank's ring
    index sees any key of ring rank i's block (decided on the host, ``heads.gathered_visibility``).

    Returns out: (B, S_r, Hq, D) in q's dtype, and what this rank keeps for backward, in the
    heads layout (ring index i): q: (B, T_i, Hq/U, D), k, v: (B, T_i, max(Hkv/U, 1), D), out like
    q, lse: (B, Hq/U, T_i).
    """
    # BEGIN SOLUTION usp forward: to heads in the ulysses group, ring over the ring group, back
    sizes = _group_sizes(positions, mesh)  # this ulysses group's U shard lengths
    ring_positions = heads.gathered_positions(positions, mesh.ulysses)  # R x (T_i,)
    ring_documents = heads.gathered_documents(documents, mesh.ulysses)  # R x (T_i,) or None
    # sequence -> heads inside the ulysses group: (B, S_r, H, D) -> (B, T_i, H/U, D)
    q_heads, k_heads, v_heads = ulysses._qkv_to_heads(q, k, v, mesh.ulysses_group, sizes)
    # ring attention over the ring group, on those tokens and heads
    out_heads, lse_heads = ring._forward(
        q_heads, k_heads, v_heads, ring_positions, ring_documents, visible, causal, scale,
        mesh.ring_group, backend,
    )  # fmt: skip
    # heads -> sequence: (B, T_i, Hq/U, D) -> (B, S_r, Hq, D)
    out = ulysses._heads_to_seq(out_heads, mesh.ulysses_group, sizes, phase="forward")
    return out, (q_heads, k_heads, v_heads, out_heads, lse_heads)
    # END SOLUTION


def _backward(dout, saved, positions, documents, visible, causal, scale, heads_kv, mesh, backend):
    """dout: (B, S_r, Hq, D); saved: what ``_forward`` kept; heads_kv: Hkv of the inputs;
    positions, documents, visible as in ``_forward``.

    Returns dq: (B, S_r, Hq, D) and dk, dv: (B, S_r, Hkv, D), in dout's dtype.
    """
    # BEGIN SOLUTION usp backward: dout to heads, the ring backward, gradients back to sequence
    sizes = _group_sizes(positions, mesh)
    ring_positions = heads.gathered_positions(positions, mesh.ulysses)  # R x (T_i,)
    ring_documents = heads.gathered_documents(documents, mesh.ulysses)  # R x (T_i,) or None
    # sequence -> heads: (B, S_r, Hq, D) -> (B, T_i, Hq/U, D)
    dout_heads = ulysses._seq_to_heads(dout, mesh.ulysses_group, sizes, phase="backward")
    # the ring backward over the ring group
    dq_heads, dk_heads, dv_heads = ring._backward(
        dout_heads, *saved, ring_positions, ring_documents, visible, causal, scale,
        mesh.ring_group, backend,
    )  # fmt: skip
    # heads -> sequence, K/V replicas summed: (B, T_i, H/U, D) -> (B, S_r, H, D)
    return ulysses._grads_to_seq(dq_heads, dk_heads, dv_heads, sizes, heads_kv, mesh.ulysses_group)
    # END SOLUTION


class _UspAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, visible, causal, scale, mesh, backend):
        out, saved = _forward(q, k, v, positions, documents, visible, causal, scale, mesh, backend)
        ctx.save_for_backward(*saved)
        ctx.options = (positions, documents, visible, causal, scale, k.shape[2], mesh, backend)
        lse_heads = saved[-1]
        ctx.mark_non_differentiable(lse_heads)
        return out, lse_heads

    @staticmethod
    def backward(ctx, dout, _dlse_heads):
        dq, dk, dv = _backward(dout.contiguous(), ctx.saved_tensors, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check_mesh(mesh) -> None:
    """Check ``mesh`` is a ``UspMesh`` with U·R == W and groups of U and R ranks."""
    if not isinstance(mesh, UspMesh):
        raise TypeError(
            f"usp needs the UspMesh that make_usp_mesh returns, got {type(mesh).__name__}"
        )
    _, world = comm.rank_and_size(mesh.group)
    check_mesh_sizes(mesh.ulysses, mesh.ring, world)
    sizes = comm.rank_and_size(mesh.ulysses_group)[1], comm.rank_and_size(mesh.ring_group)[1]
    if sizes != (mesh.ulysses, mesh.ring):
        raise ValueError(
            f"mesh groups must hold U={mesh.ulysses} and R={mesh.ring} ranks, got "
            f"ulysses_group of {sizes[0]} and ring_group of {sizes[1]}"
        )


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh: UspMesh,
    causal: bool = False,
    layout: str = "contiguous",
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """USP on (B, S_r, H, D) shards, sequence before heads: Ulysses over U ranks, ring over R.

    Call on every rank of ``mesh`` (``make_usp_mesh``) with its own shards.

    q: (B, S_r, Hq, D) this rank's queries; k, v: (B, S_r, Hkv, D) its keys and values, as
    ``sptutor.layout.shard(x, world=W, layout=layout, ulysses=U)[rank]`` makes them (the layout
    over the R ring ranks, each ring rank's tokens split contiguously over its U ulysses ranks;
    S_r = S/W, or a token more or fewer when W does not divide S: then pass ``seq_len=S``).
    ``cu_seqlens``: (N+1,) offsets of packed documents over the global sequence (the same
    tensor on every rank): a query sees only keys of its own document.
    Needs ``Hq % U == 0`` and ``Hkv % U == 0`` or ``U % Hkv == 0`` (K/V heads replicated).
    Returns out: (B, S_r, Hq, D) this rank's output (differentiable), and with ``return_lse``
    also lse: (B, Hq, S_r) (detached, float32; float64 for float64 inputs), which costs one more
    all-to-all in the ulysses group.
    """
    _check_mesh(mesh)
    ulysses._check_inputs(q, k, v, mesh.ulysses)
    positions, documents, visible, backend, scale = backends.prepare(
        "usp", q, k, group=mesh.group, causal=causal, layout=layout, backend=backend,
        scale=scale, ulysses=mesh.ulysses, return_lse=return_lse, seq_len=seq_len,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    ring_index = comm.rank_and_size(mesh.ring_group)[0]  # which ring rank this rank's group is
    ring_visible = heads.gathered_visibility(visible, mesh.ulysses)[ring_index]
    out, lse_heads = _UspAttention.apply(
        q, k, v, positions, documents, ring_visible, causal, scale, mesh, backend
    )
    if not return_lse:
        return out
    return out, ulysses._lse_to_seq(lse_heads, mesh.ulysses_group, _group_sizes(positions, mesh))
