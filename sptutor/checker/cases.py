"""The cases a check runs: one call of a method on the first W ranks of a launch, with seeded full
inputs, and the hypothesis strategy that draws a sweep of them (smallest first when shrinking).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from sptutor import layout
from sptutor.methods import LINEAR_METHODS, METHODS

DTYPES = ("float64", "float32", "float16", "bfloat16")


def random_inputs(
    batch: int,
    seq_len: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal full inputs q, k, v, dout: q, dout (B, S, Hq, D) and k, v
    (B, S, Hkv, D), drawn in float64 (in that order) and rounded to ``dtype``, so every dtype
    sees the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    q_shape, kv_shape = (batch, seq_len, heads_q, head_dim), (batch, seq_len, heads_kv, head_dim)
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        for shape in (q_shape, kv_shape, kv_shape, q_shape)
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a method on the global ranks ``members``, with seeded full inputs.

    ``layout`` is the token layout (contiguous, zigzag, striped; "custom" when a check's adapter
    says which positions each rank holds); ``ulysses`` is USP's Ulysses degree U; ``decay`` the
    per-head decay factors of linear methods; ``backend`` where sptutor's own methods compute
    their blocks (see Design, *Public API*). ``seq_len`` is any S >= W (zigzag: S >= 2W;
    shards then differ by one token); ``cu_seqlens`` the (N+1,) offsets of packed documents
    over S (0 first, S last), or None (one document).
    """

    method: str
    members: tuple[int, ...]
    layout: str
    causal: bool
    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str = "float64"
    seed: int = 0
    ulysses: int | None = None
    decay: tuple[float, ...] | None = None
    backend: str = "auto"
    cu_seqlens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.cu_seqlens is not None:
            layout.check_cu_seqlens(torch.tensor(self.cu_seqlens), self.seq_len)

    @property
    def is_linear(self) -> bool:
        return self.method in LINEAR_METHODS

    @property
    def world(self) -> int:
        """W: how many ranks the case runs on."""
        return len(self.members)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def inputs(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """Full q, dout: (B, S, Hq, D) and k, v: (B, S, Hkv, D); the same on every process.
        ``dtype`` defaults to the case's; the numbers are the case's rounded to it."""
        shape = (self.batch, self.seq_len, self.heads_q, self.heads_kv, self.head_dim)
        inputs = random_inputs(*shape, dtype=self.torch_dtype, seed=self.seed)
        return inputs if dtype is None else tuple(x.to(dtype) for x in inputs)

    def decay_tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """decay as a (Hq,) tensor of ``dtype`` (default: the inputs' dtype), or None."""
        if self.decay is None:
            return None
        return torch.tensor(self.decay, dtype=dtype or self.torch_dtype)

    @property
    def uneven(self) -> bool:
        """Do the ranks hold different numbers of tokens (W does not divide S, or 2W zigzag)?"""
        return self.seq_len % (2 * self.world if self.layout == "zigzag" else self.world) != 0

    def cu_seqlens_tensor(self) -> torch.Tensor | None:
        """cu_seqlens as a (N+1,) LongTensor, or None (one document)."""
        return None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens)

    def positions(self) -> list[torch.Tensor]:
        """Every rank's global positions under the case's token layout: W x (S_r,)."""
        degree = self.ulysses or 1
        return layout.all_positions(self.seq_len, world=self.world, layout=self.layout,
                                    ulysses=degree)  # fmt: skip

    def options(self, group, mesh) -> dict:
        """Keyword arguments of sptutor's own method: its signature in Design, *Public API*."""
        sizes = dict(seq_len=self.seq_len, cu_seqlens=self.cu_seqlens_tensor())
        if self.is_linear:
            return dict(causal=self.causal, decay=self.decay_tensor(), group=group,
                        backend=self.backend, **sizes)  # fmt: skip
        if self.method == "usp":
            return dict(causal=self.causal, layout=self.layout, mesh=mesh, backend=self.backend,
                        **sizes)  # fmt: skip
        return dict(causal=self.causal, layout=self.layout, group=group, backend=self.backend,
                    **sizes)  # fmt: skip

    def shards(self, local: int) -> tuple[torch.Tensor, ...]:
        """This group rank's q, k, v, dout shards."""
        owned = self.positions()
        return tuple(layout.shard_by(x, owned)[local] for x in self.inputs())

    def describe(self) -> str:
        """One line: 'ring W=2 zigzag causal B=1 S=8 Hq=4 Hkv=2 D=5 float32'."""
        parts = [self.method, f"W={self.world}"]
        if self.ulysses:
            parts.append(f"U={self.ulysses}")
        parts += [self.layout, "causal" if self.causal else "non-causal", f"B={self.batch}",
                  f"S={self.seq_len}", f"Hq={self.heads_q}", f"Hkv={self.heads_kv}",
                  f"D={self.head_dim}", self.dtype]  # fmt: skip
        if self.decay is not None:
            parts.append("decay=" + ",".join(f"{d:g}" for d in self.decay))
        if self.cu_seqlens is not None:
            parts.append("cu_seqlens=" + ",".join(map(str, self.cu_seqlens)))
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a check may draw: each field lists the allowed values, smallest (the shrink target)
    first. ``worlds`` are the world sizes W; ``per_rank`` the tokens per rank S/W (zigzag
    doubles them: two chunks per rank); ``gqa`` the ratios Hq/Hkv; ``decays`` whether linear
    cases draw a per-head decay (False: none; True: factors in [0.5, 1)); ``uneven`` whether S
    may be a few tokens more than W·S/W (so W does not divide it: shards differ by one);
    ``documents`` whether cases pack documents (cu_seqlens with up to 4 boundaries anywhere)."""

    worlds: tuple[int, ...]
    layouts: tuple[str, ...] = ("contiguous",)
    causal: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] = ("float32",)
    batches: tuple[int, ...] = (1, 2)
    per_rank: tuple[int, ...] = (2, 3, 4, 8)
    heads_kv: tuple[int, ...] = (1, 2)
    gqa: tuple[int, ...] = (1, 2)
    head_dims: tuple[int, ...] = (4, 5, 8, 16)
    decays: tuple[bool, ...] = (False, True)
    uneven: tuple[bool, ...] = (False,)
    documents: tuple[bool, ...] = (False,)

    def __post_init__(self) -> None:
        for name in ("worlds", "layouts", "causal", "dtypes", "batches", "per_rank", "heads_kv",
                     "gqa", "head_dims", "decays", "uneven", "documents"):  # fmt: skip
            if not getattr(self, name):
                raise ValueError(f"the sweep needs at least one value for {name}")
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"dtypes must be among {DTYPES}, got {unknown}")
        bad = [lay for lay in self.layouts if lay not in (*layout.LAYOUTS, "custom")]
        if bad:
            raise ValueError(f"layouts must be among {layout.LAYOUTS} (or 'custom'), got {bad}")

    def strategy(self, method: str):
        """A hypothesis strategy of :class:`Case` for ``method``."""
        from hypothesis import strategies as st

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")

        @st.composite
        def cases(draw) -> Case:
            world = draw(st.sampled_from(self.worlds))
            degree = draw(st.sampled_from(_divisors(world))) if method == "usp" else None
            lay = draw(st.sampled_from(self.layouts))
            unit = 2 if lay == "zigzag" else 1
            heads_kv = draw(st.sampled_from(self.heads_kv))
            heads_q = heads_kv * draw(st.sampled_from(self.gqa))
            heads_q, heads_kv = _fit_heads(method, heads_q, heads_kv, degree or world)
            causal = draw(st.sampled_from(self.causal))
            decay = None
            if method in LINEAR_METHODS and causal and draw(st.sampled_from(self.decays)):
                factors = st.integers(50, 99).map(lambda n: n / 100)  # 0.50 .. 0.99
                decay = tuple(draw(st.lists(factors, min_size=heads_q, max_size=heads_q)))
            per_rank = unit * draw(st.sampled_from(self.per_rank))
            seq_len = world * per_rank
            if draw(st.sampled_from(self.uneven)):  # a few tokens more: W no longer divides S
                seq_len += draw(st.integers(1, unit * world - 1)) if unit * world > 1 else 0
            cu_seqlens = None
            packable = causal or method not in LINEAR_METHODS  # non-causal LASP: one document
            if packable and draw(st.sampled_from(self.documents)):
                cuts = (
                    draw(st.lists(st.integers(1, seq_len - 1), max_size=4)) if seq_len > 1 else []
                )
                cu_seqlens = (0, *sorted(set(cuts)), seq_len)
            return Case(
                method=method, members=tuple(range(world)), layout=lay, causal=causal,
                batch=draw(st.sampled_from(self.batches)), seq_len=seq_len,
                heads_q=heads_q, heads_kv=heads_kv, head_dim=draw(st.sampled_from(self.head_dims)),
                dtype=draw(st.sampled_from(self.dtypes)), seed=draw(st.integers(0, 3)),
                ulysses=degree, decay=decay, cu_seqlens=cu_seqlens,
            )  # fmt: skip

        return cases()


def _divisors(n: int) -> list[int]:
    """1..n's divisors of n, smallest first: USP's Ulysses degrees U of a world of n."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _fit_heads(method: str, heads_q: int, heads_kv: int, degree: int) -> tuple[int, int]:
    """Heads a Ulysses degree can split: Hq a multiple of U (all-to-all over heads), and Hkv a
    multiple or a divisor of U (sptutor replicates K, V heads when Hkv < U)."""
    if method not in ("ulysses", "usp") or degree == 1:
        return heads_q, heads_kv
    ratio = heads_q // heads_kv
    while heads_kv % degree and degree % heads_kv:
        heads_kv += 1
    heads_q = heads_kv * ratio
    while heads_q % degree:
        heads_q += heads_kv
    return heads_q, heads_kv


def sweep_for(method: str, world: int, **fields: Sequence) -> Sweep:
    """The default sweep of a check: W = 1..world, and the token layouts, causal values and
    dtypes a method of its kind supports unless ``fields`` say otherwise."""
    defaults: dict = {"worlds": tuple(range(1, world + 1))}
    if method in LINEAR_METHODS:
        defaults |= {"layouts": ("contiguous",), "causal": (True,)}
    defaults |= {name: tuple(values) for name, values in fields.items() if values is not None}
    return Sweep(**defaults)
