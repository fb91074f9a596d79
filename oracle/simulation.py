"""``oracle.simulate``: shard full inputs, run one method on an emulated world, put results back."""

from __future__ import annotations

import importlib

import torch

from sptutor.checks import check_decay, check_linear_layout, check_qkv
from sptutor.layout import (
    all_positions,
    check_cu_seqlens,
    check_layout,
    check_partition,
    document_ids,
    shard_by,
    unshard_by,
)
from sptutor.methods import LINEAR_METHODS, METHODS, SOFTMAX_METHODS
from sptutor.oracle.world import Simulation, World

# method -> (module of oracle/, function): one file per method, as in sptutor/
_EMULATORS = {method: (method, "emulate") for method in METHODS}


def _emulator(method: str):
    module, function = _EMULATORS[method]
    try:
        return getattr(importlib.import_module(f"sptutor.oracle.{module}"), function)
    except ModuleNotFoundError as missing:
        raise ValueError(f"the {method} oracle is not written yet") from missing


def _check_options(
    method, q, k, v, dout, world, causal, layout, ulysses, decay, scale, positions, cu_seqlens
) -> int:
    """Validate everything before emulating (see Design, *Errors*); returns the Ulysses degree U."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_qkv(q, k, v)
    if dout is not None and dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    if (method == "usp") != (ulysses is not None):
        raise ValueError(
            f"ulysses= is required for usp and only for usp, got {method=}, {ulysses=}"
        )
    if method in LINEAR_METHODS:
        check_linear_layout(layout)
        if scale is not None:
            raise ValueError(f"{method} is linear attention: it takes no scale, got scale={scale}")
        check_decay(decay, q, causal)
    elif decay is not None:
        raise ValueError(f"decay is for linear attention (lasp, lasp2), not {method}")
    ulysses = ulysses or 1
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[1])
    if positions is None:
        check_layout(q.shape[1], world=world, layout=layout, ulysses=ulysses)
        return ulysses
    if method in LINEAR_METHODS:
        raise ValueError(f"{method} carries its state rank to rank: it takes no positions")
    if len(positions) != world:
        raise ValueError(f"positions needs one tensor per rank: W={world}, got {len(positions)}")
    check_partition(positions, q.shape[1])
    if world % ulysses:
        raise ValueError(f"ulysses degree must divide the world, got W={world}, U={ulysses}")
    return ulysses


def simulate(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None = None,
    *,
    world: int,
    causal: bool = False,
    layout: str = "contiguous",
    ulysses: int | None = None,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    positions: list[torch.Tensor] | None = None,
    record_steps: bool = False,
    emulate=None,
    cu_seqlens: torch.Tensor | None = None,
) -> Simulation:
    """Emulate ``method`` on ``world`` ranks, full (B, S, H, D) inputs, sequence before heads.

    Returns full-size results, every rank's record and the ledger.

    q: (B, S, Hq, D); k, v: (B, S, Hkv, D) full, unsharded inputs; dout: (B, S, Hq, D) or None
    (forward only). They are sharded with ``layout`` (composed with ``ulysses=U`` for usp), or
    by ``positions`` when given: ``positions[r]`` (S/W,) the global positions rank r holds, in
    order (every position once; softmax methods only; ``layout`` is then ignored). Any S >= W
    works (zigzag: S >= 2W): shards then differ by one token. ``cu_seqlens``: (N+1,) offsets
    of packed documents over the S tokens (0 first, S last): a query sees only keys of its own
    document, and linear attention's state starts afresh at each document.
    ``record_steps`` keeps what every step computed in ``Simulation.steps``; ``emulate`` runs
    another emulation of the method instead of the oracle's own, with its signature (the
    exercises' grader runs a learner's this way).
    Returns a ``Simulation``: out (B, S, Hq, D), lse (B, Hq, S) (None for linear methods),
    dq, dk, dv full-size (None without dout), ``ranks[r]`` what rank r holds, and the ledger.
    """
    degree = _check_options(
        method, q, k, v, dout, world, causal, layout, ulysses, decay, scale, positions, cu_seqlens
    )
    seq_len, head_dim = q.shape[1], q.shape[3]
    if positions is None:
        positions = all_positions(seq_len, world=world, layout=layout, ulysses=degree)
    else:
        positions, layout = [p.to(torch.long).cpu() for p in positions], "custom"

    def cut(x: torch.Tensor | None) -> list[torch.Tensor] | None:
        return None if x is None else shard_by(x, positions)

    documents = [None] * world  # one document: masks from positions alone
    if cu_seqlens is not None:
        documents = [document_ids(cu_seqlens, p) for p in positions]
    options = {"positions": positions, "documents": documents, "causal": causal}
    if method in SOFTMAX_METHODS:
        options["scale"] = head_dim**-0.5 if scale is None else scale
    if method == "usp":
        options["ulysses"] = degree
    if method in LINEAR_METHODS:
        options["decay"] = decay
    emulated = World(list(range(world)), steps=[] if record_steps else None)
    emulate = emulate or _emulator(method)
    records = emulate(emulated, cut(q), cut(k), cut(v), cut(dout), **options)

    def glue(name: str, dim: int = 1) -> torch.Tensor | None:
        parts = [getattr(record, name) for record in records]
        return None if parts[0] is None else unshard_by(parts, positions, dim=dim)

    return Simulation(
        out=glue("out"), lse=glue("lse", dim=2), dq=glue("dq"), dk=glue("dk"), dv=glue("dv"),
        ranks=records, ledger=emulated.ledger, method=method, world=world, layout=layout,
        causal=causal, ulysses=degree, positions=positions, decay=decay, cu_seqlens=cu_seqlens,
        documents=documents,
        shape=(q.shape[0], seq_len, q.shape[2], k.shape[2], head_dim),
        steps=emulated.steps or [],
    )  # fmt: skip
