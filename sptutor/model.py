"""A tiny GPT whose attention is full (one process) or any sequence-parallel method of sptutor.

Pre-norm blocks (norm → attention → residual, norm → MLP → residual), a tied LM head, and two
attention families:

- softmax (``"full"`` on one process; ``rsa``, ``ring``, ``ulysses``, ``usp``, ``lss`` on W ranks):
  causal attention with RoPE, whose angles come from the **global** positions of this rank's tokens
  (``sptutor.layout.positions``), so a sharded run rotates every token exactly as the full run does
  (with ``rope_per_document``, from the positions inside each packed document);
- linear (``"linear"`` on one process; ``lasp``, ``lasp2`` on W ranks): causal, unnormalised linear
  attention (see Design, *Linear attention*) on the feature map ``elu(x) + 1`` (positive, as in
  Katharopoulos et al. 2020; the design leaves feature maps to the caller), with a fixed per-head
  decay that gives the order of tokens (no RoPE) and an RMSNorm on its output, as TransNormerLLM
  does.

Every rank holds the whole model and runs :meth:`TinyGPT.forward` on its shard of the sequence;
the loss it returns is its tokens' share of the full-sequence mean (see ``docs/training.md``).
Any S >= W works (pass ``seq_len=S`` when W does not divide it), and packed documents
(``cu_seqlens``): attention stays inside each document, linear attention's state restarts at each
one, and the loss skips the target of each document's last token (``sptutor.positions``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sptutor import blocks, lasp, lasp2, lss, ring, rsa, ulysses, usp
from sptutor.mesh import UspMesh
from sptutor.methods import LINEAR_METHODS, SOFTMAX_METHODS
from sptutor.oracle import reference
from sptutor.positions import (  # noqa: F401 (sp_positions, sp_world: re-exported)
    Placement,
    counted_per_sequence,
    counted_targets,
    place,
    rotary,
    sp_positions,
    sp_world,
)

IGNORE = -100  # a target F.cross_entropy skips (its default ignore_index)

ATTENTIONS = ("full", "linear", *SOFTMAX_METHODS, *LINEAR_METHODS)
_SP_ATTENTION = {
    "rsa": rsa.rsa_attention, "ring": ring.ring_attention, "ulysses": ulysses.ulysses_attention,
    "usp": usp.usp_attention, "lss": lss.lss_attention,
    "lasp": lasp.lasp_attention, "lasp2": lasp2.lasp2_attention,
}  # fmt: skip


@dataclass(frozen=True)
class GPTConfig:
    """Sizes and attention of the tiny GPT.

    ``attention`` is ``"full"``, ``"linear"`` (single-process baselines) or a method of sptutor
    (see Design, *Methods*); ``layout`` is how the sequence is cut over the SP ranks (see Design,
    *Layouts*); ``ulysses`` is USP's Ulysses degree U; ``heads_kv < heads_q`` is GQA; ``dtype``
    names a torch float dtype; ``rope_per_document`` turns each token by its position inside its
    packed document instead of its global position (softmax models only: linear ones have no RoPE).
    """

    vocab: int = 96
    d_model: int = 64
    heads_q: int = 4
    heads_kv: int = 2
    layers: int = 2
    seq_len: int = 64
    attention: str = "full"
    layout: str = "contiguous"
    ulysses: int = 1
    dtype: str = "float32"
    norm: str = "rms"
    mlp_ratio: int = 4
    rope_per_document: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.d_model % self.heads_q or (self.d_model // self.heads_q) % 2:
            raise ValueError(
                "d_model must split into heads_q heads of even size (RoPE rotates pairs), "
                f"got d_model={self.d_model}, heads_q={self.heads_q}"
            )
        if self.heads_q % self.heads_kv:
            raise ValueError(f"need Hq % Hkv == 0, got Hq={self.heads_q}, Hkv={self.heads_kv}")
        if self.attention in LINEAR_METHODS and self.layout != "contiguous":
            raise ValueError(f"{self.attention} needs layout='contiguous', got {self.layout!r}")
        if self.ulysses != 1 and self.attention != "usp":
            raise ValueError(f"only usp has a Ulysses degree, got ulysses={self.ulysses}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.rope_per_document and self.is_linear:
            raise ValueError(
                f"rope_per_document needs softmax attention: {self.attention} has no RoPE"
            )

    @property
    def head_dim(self) -> int:
        """D = d_model / Hq."""
        return self.d_model // self.heads_q

    @property
    def is_linear(self) -> bool:
        """Does the model use linear attention (``linear``, ``lasp``, ``lasp2``)?"""
        return self.attention in ("linear", *LINEAR_METHODS)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def baseline(self) -> GPTConfig:
        """The same model on one process: full softmax or full linear attention."""
        return replace(self, attention="linear" if self.is_linear else "full", ulysses=1)


def linear_decay(heads_q: int, like: torch.Tensor) -> torch.Tensor:
    """Per-head decay ``exp(-2^(-8(h+1)/Hq))``, (Hq,): ALiBi slopes, as LASP's TransNormerLLM.

    Made on ``like``'s device in its accumulation dtype (float32 for 16-bit ``like``): the decay
    is raised to powers up to S, and a 16-bit rounding of it would grow S-fold in the exponent.
    """
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads_q + 1, dtype=torch.float64) / heads_q)
    return torch.exp(-slopes).to(device=like.device, dtype=blocks.accumulation_dtype(like.dtype))


class Attention(nn.Module):
    """Projections around the attention of ``config.attention``; the SP call happens here."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        heads_q, heads_kv, head_dim = config.heads_q, config.heads_kv, config.head_dim
        options = dict(bias=False, dtype=config.torch_dtype)
        self.q_proj = nn.Linear(config.d_model, heads_q * head_dim, **options)
        self.kv_proj = nn.Linear(config.d_model, 2 * heads_kv * head_dim, **options)
        self.out_proj = nn.Linear(heads_q * head_dim, config.d_model, **options)
        self.out_norm = (
            nn.RMSNorm(heads_q * head_dim, dtype=config.torch_dtype) if config.is_linear else None
        )

    def forward(self, x: torch.Tensor, where: Placement) -> torch.Tensor:
        """x: (B, S_loc, d_model) this rank's tokens, placed by ``where``. Same shape out."""
        config = self.config
        batch, seq_local, _ = x.shape
        q = self.q_proj(x).view(
            batch, seq_local, config.heads_q, config.head_dim
        )  # (B, S_loc, Hq, D)
        # (B, S_loc, 2·Hkv·D) -> (B, S_loc, 2, Hkv, D)
        kv = self.kv_proj(x).view(batch, seq_local, 2, config.heads_kv, config.head_dim)
        k, v = kv.unbind(2)  # (B, S_loc, Hkv, D) each
        if config.is_linear:
            out = self._linear(F.elu(q) + 1, F.elu(k) + 1, v, where)
            out = self.out_norm(out.reshape(batch, seq_local, -1))  # linear outputs grow: rescale
        else:
            out = self._softmax(rotary(q, where.rope), rotary(k, where.rope), v, where)
        return self.out_proj(out.reshape(batch, seq_local, -1))

    def _softmax(self, q, k, v, where: Placement):
        """Causal softmax attention of this rank's shard: (B, S_loc, Hq, D)."""
        name, lay = self.config.attention, self.config.layout
        if name == "full":  # one process: the ground truth, independent of what it checks
            pos = where.positions
            return reference.full_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos,
                                            cu_seqlens=where.cu_seqlens)[0]  # fmt: skip
        sequence = dict(seq_len=where.seq_len, cu_seqlens=where.cu_seqlens)
        if name == "usp":
            return usp.usp_attention(q, k, v, mesh=where.mesh, causal=True, layout=lay, **sequence)
        return _SP_ATTENTION[name](q, k, v, causal=True, layout=lay, group=where.group, **sequence)

    def _linear(self, q, k, v, where: Placement):
        """Causal linear attention with decay of this rank's shard: (B, S_loc, Hq, D)."""
        decay = linear_decay(q.shape[2], q)
        if self.config.attention == "linear":  # one process: the ground truth
            return reference.full_linear_attention(q, k, v, causal=True, decay=decay,
                                                   cu_seqlens=where.cu_seqlens)  # fmt: skip
        return _SP_ATTENTION[self.config.attention](
            q, k, v, causal=True, decay=decay, group=where.group, seq_len=where.seq_len,
            cu_seqlens=where.cu_seqlens,
        )  # fmt: skip


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        norm = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
        width, dtype = config.d_model, config.torch_dtype
        self.attn_norm, self.mlp_norm = norm(width, dtype=dtype), norm(width, dtype=dtype)
        self.attn = Attention(config)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.mlp_ratio * width, dtype=dtype),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * width, width, dtype=dtype),
        )

    def forward(self, x: torch.Tensor, where: Placement) -> torch.Tensor:
        """x: (B, S_loc, d_model) -> (B, S_loc, d_model)."""
        x = x + self.attn(self.attn_norm(x), where)
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, a final norm and the tied LM head.

    Parameters are drawn from a generator seeded with ``seed``, so every rank builds the same model.
    """

    def __init__(self, config: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model, dtype=config.torch_dtype)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        norm = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
        self.final_norm = norm(config.d_model, dtype=config.torch_dtype)
        self._init_weights(torch.Generator().manual_seed(seed))

    def _init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02) for matrices, output projections scaled by 1/sqrt(2·layers)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() < 2:
                    continue  # norms keep weight 1 and bias 0; biases stay 0
                std = 0.02 / (2 * self.config.layers) ** 0.5 if "out_proj" in name else 0.02
                param.copy_(
                    torch.randn(param.shape, generator=generator, dtype=torch.float64) * std
                )
            for block in self.blocks:
                nn.init.zeros_(block.mlp[0].bias)
                nn.init.zeros_(block.mlp[2].bias)

    def logits(self, ids, *, group=None, mesh: UspMesh | None = None, positions=None,
               seq_len: int | None = None, cu_seqlens: torch.Tensor | None = None):  # fmt: skip
        """ids: (B, S_loc) this rank's tokens -> logits: (B, S_loc, vocab).

        ``group`` is the SP group (``mesh`` for usp); ``positions`` (S_loc,) overrides the global
        positions the layout gives this rank (default: ``sp_positions``): softmax attention takes
        tokens in any order, linear attention reads them in sequence order only. ``seq_len``: the
        global S (default ``cu_seqlens[-1]``, else W·S_loc; needed when W does not divide S);
        ``cu_seqlens``: (N+1,) packed documents' global offsets, the same on every rank.
        """
        where = place(self.config, ids, group=group, mesh=mesh, positions=positions,
                      seq_len=seq_len, cu_seqlens=cu_seqlens)  # fmt: skip
        return self._logits(ids, where)

    def _logits(self, ids: torch.Tensor, where: Placement) -> torch.Tensor:
        """ids: (B, S_loc) placed by ``where`` -> logits (B, S_loc, vocab)."""
        x = self.embed(ids)  # (B, S_loc, d_model)
        for block in self.blocks:
            x = block(x, where)
        return F.linear(self.final_norm(x), self.embed.weight)  # tied head: (B, S_loc, vocab)

    def forward(self, ids, targets, *, group=None, mesh: UspMesh | None = None, positions=None,
                seq_len: int | None = None, cu_seqlens: torch.Tensor | None = None):  # fmt: skip
        """ids, targets: (B, S_loc) this rank's shard of inputs and next tokens -> scalar loss.

        Arguments as :meth:`logits`. The loss is the sum of this rank's counted token losses over
        the **global** count of counted targets, B·S (packed: B·(S − non-empty documents), the
        target of a document's last token is not counted), so the SP ranks' losses add up to the
        full-sequence mean (and their gradients add up too).
        """
        where = place(self.config, ids, group=group, mesh=mesh, positions=positions,
                      seq_len=seq_len, cu_seqlens=cu_seqlens)  # fmt: skip
        tokens = ids.shape[0] * counted_per_sequence(where.seq_len, where.cu_seqlens)
        counted = counted_targets(where.positions, where.cu_seqlens)
        return local_loss(self._logits(ids, where), targets, tokens, counted)


def local_loss(
    logits: torch.Tensor, targets: torch.Tensor, tokens: int, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy summed over this shard's counted tokens, divided by ``tokens`` (global).

    logits: (B, S_loc, vocab); targets: (B, S_loc); ``counted``: (S_loc,) bool, the tokens whose
    targets count (None: all; see ``sptutor.positions.counted_targets``); ``tokens``: the global
    count of counted targets (B·S unpacked). Returns a scalar.
    """
    if counted is not None:
        targets = targets.masked_fill(~counted.to(targets.device), IGNORE)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return losses / tokens
