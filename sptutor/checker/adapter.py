"""How a check calls your attention function: your conventions (the adapter), and the body each
rank runs for one case.

Your function takes this rank's q, k, v shards, in your tensor layout, and your keywords; the
adapter says which keyword means causal, how the process group arrives, what comes back, and so
on, so that any signature can be checked without a wrapper.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch

from sptutor import layout
from sptutor.checker.cases import Case

TENSOR_LAYOUTS = ("bshd", "bhsd")
RETURNS = ("auto", "out", "out_lse")
CLI_KEYWORDS = ("causal_keyword", "group_keyword", "layout_keyword")  # sptutor check's --*-keyword


@dataclasses.dataclass(frozen=True)
class Context:
    """What ``setup`` gets, on every process of the launch, before each case.

    ``rank``: this process's rank in the case's group (None outside it: torch needs every
    process to take part in creating a group, so setup runs there too); ``world``: the case's W;
    ``group``: the case's process group (the first W ranks of the launch); ``members``: their
    global ranks; ``case``: the :class:`Case` (``case.ulysses`` is USP's U).
    """

    rank: int | None
    world: int
    group: Any
    members: tuple[int, ...]
    case: Case


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Your function's conventions.

    - ``tensor_layout``: "bshd" (B, S/W, H, D) or "bhsd" (B, H, S/W, D), for q, k, v, out and
      the gradients.
    - ``causal_keyword``, ``group_keyword``, ``layout_keyword``: the keyword that receives
      causal (bool), the process group, the token layout's name; None: not passed.
    - ``returns``: "out", "out_lse" ((out, lse), lse (B, H, S/W), or (B, S/W, H) with
      ``lse_layout="bsh"``) or "auto" (a tuple's first two items, else out alone).
    - ``backward``: also check dq, dk, dv (autograd through your function).
    - ``kwargs``: your own fixed keywords; ``setup(ctx: Context) -> dict | None`` runs on every
      process before each case and may return more keywords (e.g. a mesh made for this W).
    - ``positions(rank, world, seq_len) -> (S/W,) LongTensor``: the global positions rank holds,
      when your code shards its own way (the case's layout is then "custom").
    - ``decay``: linear attention's per-head decay as your function takes it: "factor" (the (H,)
      factors in (0, 1]), "slope" (``-log(factor)``, so ``factor = exp(-slope)``) or a callable
      from the (H,) factor tensor; passed as ``decay_keyword``.
    - ``seq_len_keyword``: the keyword that receives the global S (an int), for code that needs
      it when W does not divide S; None: not passed.
    - ``cu_seqlens_keyword``: the keyword that receives packed documents' offsets; None: your
      function takes no documents (a sweep that packs documents then refuses to start).
      ``cu_seqlens_scope``: "global" (the (N+1,) offsets over the whole sequence, the same on
      every rank) or "local" (this rank's own offsets over its shard, from
      ``sptutor.layout.documents_of``: where its runs of one document start, then S_r; they do
      not say which document a run is, so code that matches documents across ranks, any ring,
      needs ``document_ids_keyword`` or the global offsets too). An uneven case without
      documents passes one document there when there is no ``seq_len_keyword``: ``[0, S]``, or
      locally ``[0, S_r]``; a case with neither documents nor uneven shards passes nothing.
    - ``document_ids_keyword``: the keyword that receives this rank's document ids (S_r,), one
      per token in its storage order, numbered over the whole sequence (the same document has
      the same id on every rank: segment ids); passed in cases with documents only.
    """

    tensor_layout: str = "bshd"
    causal_keyword: str | None = "causal"
    group_keyword: str | None = "group"
    layout_keyword: str | None = None
    returns: str = "auto"
    lse_layout: str = "bhs"
    backward: bool = True
    kwargs: dict = dataclasses.field(default_factory=dict)
    setup: Callable[[Context], dict | None] | None = None
    positions: Callable[[int, int, int], torch.Tensor] | None = None
    decay: str | Callable[[torch.Tensor], Any] = "factor"
    decay_keyword: str = "decay"
    seq_len_keyword: str | None = None
    cu_seqlens_keyword: str | None = None
    cu_seqlens_scope: str = "global"
    document_ids_keyword: str | None = None

    def __post_init__(self) -> None:
        if self.cu_seqlens_scope not in ("global", "local"):
            raise ValueError(f"cu_seqlens_scope must be 'global' or 'local', "
                             f"got {self.cu_seqlens_scope!r}")  # fmt: skip
        if self.tensor_layout not in TENSOR_LAYOUTS:
            raise ValueError(f"tensor_layout must be one of {TENSOR_LAYOUTS}, "
                             f"got {self.tensor_layout!r}")  # fmt: skip
        if self.returns not in RETURNS:
            raise ValueError(f"returns must be one of {RETURNS}, got {self.returns!r}")
        if self.lse_layout not in ("bhs", "bsh"):
            raise ValueError(f"lse_layout must be 'bhs' or 'bsh', got {self.lse_layout!r}")
        if not (callable(self.decay) or self.decay in ("factor", "slope")):
            raise ValueError(f"decay must be 'factor', 'slope' or a callable, got {self.decay!r}")
        for name in ("setup", "positions"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be a callable or None")

    def owned(self, case: Case) -> list[torch.Tensor]:
        """Every rank's global positions for ``case``: W x (S/W,)."""
        if self.positions is None:
            return case.positions()
        owned = [torch.as_tensor(self.positions(r, case.world, case.seq_len)).long()
                 for r in range(case.world)]  # fmt: skip
        layout.check_partition(owned, case.seq_len)
        return owned

    def to_yours(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) -> your tensor layout."""
        return x.transpose(1, 2).contiguous() if self.tensor_layout == "bhsd" else x

    def from_yours(self, x: torch.Tensor | None, what: str) -> torch.Tensor | None:
        """Your tensor layout -> (B, S, H, D); a non-tensor is an error naming ``what``."""
        if x is None:
            return None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        return x.transpose(1, 2) if self.tensor_layout == "bhsd" else x

    def unpack(self, result: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Your function's return value -> (out in your layout, lse (B, H, S/W) or None)."""
        if isinstance(result, torch.Tensor):
            if self.returns == "out_lse":
                raise TypeError("returns='out_lse' but the function returned one tensor")
            return result, None
        if not isinstance(result, tuple | list) or not result:
            raise TypeError(f"the function must return a tensor or a tuple, got {type(result)}")
        if self.returns == "out" or len(result) < 2:
            return result[0], None
        lse = result[1]
        if isinstance(lse, torch.Tensor) and self.lse_layout == "bsh":
            lse = lse.transpose(1, 2)
        return result[0], lse

    def decay_argument(self, decay: torch.Tensor) -> Any:
        """The (H,) decay factors as your function takes them."""
        if callable(self.decay):
            return self.decay(decay)
        return -torch.log(decay) if self.decay == "slope" else decay

    def keywords(self, case: Case, group, extra: dict | None, local: int | None = None) -> dict:
        """The keywords of one call on group rank ``local``: causal, group, layout, decay, S,
        documents, yours, setup's."""
        found = dict(self.kwargs) | self._sizes(case, local)
        if self.causal_keyword is not None:
            found[self.causal_keyword] = case.causal
        if self.group_keyword is not None:
            found[self.group_keyword] = group
        if self.layout_keyword is not None:
            found[self.layout_keyword] = case.layout
        if case.decay is not None:
            found[self.decay_keyword] = self.decay_argument(case.decay_tensor())
        return found | (extra or {})

    def keyword_hint(self, error: TypeError) -> str | None:
        """For your function refusing a keyword check() passed ("unexpected keyword argument
        'causal'"): which adapter option named it, and how to rename it; None otherwise."""
        found = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        fields = ("causal_keyword", "group_keyword", "layout_keyword", "decay_keyword",
                  "seq_len_keyword", "cu_seqlens_keyword", "document_ids_keyword")  # fmt: skip
        named = [f for f in fields if found and getattr(self, f) == found.group(1)]
        if not named:
            return None
        field = named[0]
        flag = f"--{field.replace('_', '-')}"
        flag = f" ({flag} on the command line)" if field in CLI_KEYWORDS else ""
        return (f"check() passes {found.group(1)}= because {field}={found.group(1)!r}: give "
                f"{field} your function's name for that keyword{flag}, or None if it takes "
                "none")  # fmt: skip

    def _sizes(self, case: Case, local: int | None) -> dict:
        """The sequence length and documents of ``case``, as your keywords take them."""
        found, offsets = {}, case.cu_seqlens_tensor()
        if offsets is not None and self.document_ids_keyword is not None:
            ids = layout.documents_of(offsets, self.owned(case)[local])[0]
            found[self.document_ids_keyword] = ids
        if self.seq_len_keyword is not None:
            found[self.seq_len_keyword] = case.seq_len
        elif offsets is None and case.uneven and self.cu_seqlens_keyword is not None:
            offsets = torch.tensor([0, case.seq_len])  # one document says S
        if offsets is None or self.cu_seqlens_keyword is None:
            return found
        if self.cu_seqlens_scope == "local":
            offsets = layout.documents_of(offsets, self.owned(case)[local])[1]
        return found | {self.cu_seqlens_keyword: offsets}


def for_sptutor(method: str, backend: str = "auto") -> Adapter:
    """The adapter of sptutor's own ``<method>_attention`` (returning its LSE too, where that
    sends nothing more)."""
    from sptutor.methods import LINEAR_METHODS

    sizes = {"seq_len_keyword": "seq_len", "cu_seqlens_keyword": "cu_seqlens"}
    if method in LINEAR_METHODS:
        return Adapter(kwargs={"backend": backend}, **sizes)
    # Ulysses' LSE costs one more all-to-all, which the ledger of the default call lacks
    options = {"backend": backend, "return_lse": method not in ("ulysses", "usp")}
    if method == "usp":
        return Adapter(group_keyword=None, layout_keyword="layout", kwargs=options,
                       setup=_usp_mesh, **sizes)  # fmt: skip
    return Adapter(layout_keyword="layout", kwargs=options, **sizes)


_MESHES: dict = {}


def _usp_mesh(ctx: Context) -> dict:
    """setup of sptutor's usp: a mesh of U x R for the case's group (made once per group)."""
    from sptutor import make_usp_mesh

    key = (ctx.members, ctx.case.ulysses)
    if key not in _MESHES:
        degree = ctx.case.ulysses
        _MESHES[key] = make_usp_mesh(degree, ctx.world // degree, ctx.group)
    return {"mesh": _MESHES[key]}
