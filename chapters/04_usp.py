# %% [markdown]
# # 4. USP: Ulysses inside, ring across
#
# Fang & Zhao, *A Unified Sequence Parallelism Approach for Long Context Generative AI* (Tencent,
# 2024, arXiv 2405.07719; code `feifeibear/long-context-attention`) observe that the two exact
# methods of the last chapters have opposite limits. DeepSpeed-Ulysses (chapter 3) moves little
# data, but it cuts the **heads**, so it can use no more ranks than there are heads, and its
# all-to-alls want a fast network. Ring attention (chapter 2) works on any number of ranks and
# overlaps its point-to-point messages with compute, but every rank sends the whole sequence's K
# and V. **USP** (unified sequence parallelism) runs both at once on a 2-D mesh of ranks:
# Ulysses inside small groups, a ring across them.
#
# This chapter builds the mesh and shows which tokens each rank holds. It shows that USP with
# the whole world in one Ulysses group *is* Ulysses, and with groups of one rank *is* the ring,
# by comparing ledgers message for message. It sets the paper's cost table beside our ledger,
# checks the paper's tips on sequence parallelism against measured figures, and finally runs the
# real code on 4 processes against the oracle.

# %% tags=["hide-input"]
import itertools

import matplotlib.pyplot as plt
import torch

import sptutor.usp as real_usp
from sptutor import cost, launch, layout, oracle, plots
from sptutor.mesh import make_usp_mesh
from sptutor.notebook import check_real, show
from sptutor.oracle import usp as oracle_usp
from sptutor.testing import random_inputs, relative_error


def message_keys(sim, rank=None):
    """The ledger's message events as (op, rank, peer, nbytes, phase, step), in logged order."""
    return [event.key() for event in sim.ledger.messages(rank)]


# %% [markdown]
# ## The 2-D mesh
#
# The paper writes the sequence-parallel degree as $N = \text{ulysses\_degree} \times
# \text{ring\_degree}$. In sptutor's alphabet this is $W = U \cdot R$. The W ranks form R rows of U:
#
# $$\text{rank} = i \cdot U + j, \qquad i = \text{ring index} \in [0, R),\quad
# j = \text{ulysses index} \in [0, U).$$
#
# A **Ulysses group** is a row, the U *contiguous* ranks $iU, \dots, iU + U - 1$. A **ring group**
# is a column, the R *strided* ranks $j, j + U, j + 2U, \dots$. Contiguous ranks usually share a
# node, so the all-to-alls stay on the fast links and the ring's messages cross the slow ones.
# The paper's `set_seq_parallel_pg` builds the same layout. Real code builds the groups with
# `make_usp_mesh`, which is collective: every rank calls it with the same arguments.

# %% tags=["hide-input"]
show(make_usp_mesh)

# %% [markdown]
# The oracle keeps every group's members at once:

# %% tags=["hide-input"]
show(oracle_usp._mesh)

# %% [markdown]
# ## Which tokens each rank holds
#
# USP's layout composes two cuts. The ring layout (here **zigzag**, which balances causal work)
# is applied over the R ring ranks: ring rank i owns chunks $i$ and $2R-1-i$ of the sequence cut
# into $2R$ chunks. Each ring rank's tokens are then split contiguously over its U Ulysses ranks.
# After the first all-to-all, every rank of a Ulysses group holds its ring rank's $S/R$ tokens on
# $H/U$ heads. Those are exactly the tokens that ring rank i owns in a plain zigzag ring of R
# ranks, which is why the ring step afterwards is the ordinary ring of chapter 2. Here W = 4,
# U = 2, R = 2, S = 16:

# %%
S, W, U = 16, 4, 2
R = W // U
print(f"{'rank':>4} {'i':>2} {'j':>2}  {'tokens (S/W)':<17} after the all-to-all (S/R)")
for rank in range(W):
    ring_index, ulysses_index = divmod(rank, U)
    before = layout.positions(S, world=W, rank=rank, layout="zigzag", ulysses=U)
    group = range(ring_index * U, (ring_index + 1) * U)
    after = torch.cat(
        [layout.positions(S, world=W, rank=m, layout="zigzag", ulysses=U) for m in group]
    )
    plain_ring = layout.positions(S, world=R, rank=ring_index, layout="zigzag")
    assert torch.equal(after, plain_ring)  # the group holds what a plain R-rank zigzag ring holds
    print(f"{rank:>4} {ring_index:>2} {ulysses_index:>2}  {before.tolist()!s:<17} {after.tolist()}")

# %% [markdown]
# ## The step: the oracle and the real code
#
# Algorithm 1 of the paper, USP-Attn, is four lines: an all-to-all of Q, K, V in the Ulysses
# group, load-balanced ring attention in the ring group, and an all-to-all of O back. sptutor
# writes none of it twice. The all-to-all steps are Ulysses' own functions and the ring step is
# ring attention's `_forward`, run on the mesh's two groups. The oracle runs each step on every
# group's emulated sub-world (`_in_groups`), and all the sub-worlds share one ledger:

# %% tags=["hide-input"]
show(oracle_usp._forward)

# %% [markdown]
# The real code runs the same steps on this rank's two process groups:

# %% tags=["hide-input"]
show(real_usp._forward)

# %% [markdown]
# The backward mirrors it: an all-to-all of dout, ring attention's backward, then all-to-alls of
# dq, dk, dv (K/V replicas summed when Hkv < U).

# %% tags=["hide-input"]
show(real_usp._backward)

# %% [markdown]
# ## An emulated run
#
# USP on W = 4 (U = 2, R = 2), zigzag, causal, GQA with Hq = 4 and Hkv = 2, in float64. The
# oracle's output and gradients must equal full attention's. Its ledger (bytes per rank and phase)
# and what each rank keeps for backward must equal the closed forms in `sptutor.cost`.

# %%
B, S, Hq, Hkv, D = 1, 16, 4, 2, 8
q, k, v, dout = random_inputs(B, S, Hq, Hkv, D)
sim = oracle.simulate("usp", q, k, v, dout, world=W, ulysses=U, layout="zigzag", causal=True)

q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q, k, v))
reference, _ = oracle.full_attention(q_ref, k_ref, v_ref, causal=True)
reference.backward(dout)
errors = {
    "out": relative_error(sim.out, reference),
    "dq": relative_error(sim.dq, q_ref.grad),
    "dk": relative_error(sim.dk, k_ref.grad),
    "dv": relative_error(sim.dv, v_ref.grad),
}
assert max(errors.values()) < 1e-12  # float64: the same sums, reordered
print("oracle vs full attention:", ", ".join(f"{n} {e:.0e}" for n, e in errors.items()))

closed_form = cost.of("usp", cost.Shape.of(q, k), W, ulysses=U)
for rank in range(W):
    sent = tuple(sim.ledger.bytes_sent(rank, phase) for phase in ("forward", "backward"))
    assert sent == (closed_form.forward[rank], closed_form.backward[rank])
    assert sim.ranks[rank].saved_bytes == closed_form.saved[rank]
print("ledger bytes and saved bytes == sptutor.cost.usp for every rank\n")
print(sim.ledger.summary())

# %% [markdown]
# Who holds what: before the all-to-all each rank has all heads of its S/W tokens; after it, each
# rank has H/U heads of its Ulysses group's S/R tokens.

# %%
plots.heads_and_tokens(sim)
plt.show()

# %% [markdown]
# The schedule: ranks as lanes, events in each rank's own order. The all-to-alls are bands over
# a Ulysses group ({0, 1} and {2, 3}), the ring's sends are arrows within a ring group ({0, 2} and
# {1, 3}), and compute boxes are shaded by useful work. Under zigzag every rank does the same
# work.

# %%
plots.schedule(sim)
plt.show()

# %%
macs = [sim.ledger.macs(rank) for rank in range(W)]
balance = max(macs) / min(macs)
assert balance == 1.0
print(f"useful MACs per rank {macs}: max/min = {balance:.2f}")

# %% [markdown]
# ## U = W is Ulysses, U = 1 is the ring, message for message
#
# The paper's first tip says unified SP "covers" both methods. This is easy to claim and easy to
# check: with $U = W$ (one Ulysses group, ring groups of one rank, which move nothing) the ledger
# must be Ulysses' ledger, and with $U = 1$ (Ulysses groups of one rank) it must be the ring's.
# The check below compares every message's (op, rank, peer, bytes, phase, step), in order, for
# every layout, causal or not.
#
# One caveat about *tokens*: with $U = W$ there is a single ring rank. It owns the whole sequence
# under any layout, and that sequence is split contiguously over the Ulysses ranks. So USP's
# token assignment equals Ulysses' only under the **contiguous** layout. The messages are the
# same under every layout, because an all-to-all's size does not depend on which tokens it
# carries. With $U = 1$ the assignments are the ring's under every layout.

# %%
q, k, v, dout = random_inputs(1, 16, 4, 4, 8)
row = "{:<10} {:<6} {:>8}  {:<13} {:<7} {:<13} {}".format
print(row("", "", "messages", "U=W: same as", "same", "U=1: same as", "same"))
print(row("layout", "causal", "per call", "ulysses", "tokens", "ring", "tokens"))
for lay in layout.LAYOUTS:
    for causal in (False, True):
        options = dict(world=W, layout=lay, causal=causal)
        usp_w = oracle.simulate("usp", q, k, v, dout, ulysses=W, **options)
        usp_1 = oracle.simulate("usp", q, k, v, dout, ulysses=1, **options)
        uly = oracle.simulate("ulysses", q, k, v, dout, **options)
        ring = oracle.simulate("ring", q, k, v, dout, **options)
        assert message_keys(usp_w) == message_keys(uly)
        assert message_keys(usp_1) == message_keys(ring)
        same_w = all(torch.equal(a, b) for a, b in zip(usp_w.positions, uly.positions))
        same_1 = all(torch.equal(a, b) for a, b in zip(usp_1.positions, ring.positions))
        assert same_w == (lay == "contiguous") and same_1
        assert relative_error(usp_w.out, uly.out) < 1e-12  # and the same results
        assert relative_error(usp_1.dq, ring.dq) < 1e-12
        count = len(message_keys(uly))
        print(row(lay, str(causal), count, "yes", str(same_w), "yes", same_1))

# %% [markdown]
# ## The paper's cost table beside our ledger
#
# Fang & Zhao's Table 2 (arXiv 2405.07719, later version v5) gives the communication and memory
# costs of one standard transformer block, in the paper's notation: `bs` batch, `L` sequence
# length, `d` hidden size, `hc` heads, `N` the parallel degree. "Param" is the collective on
# parameters and gradients, and "Act" the collectives on activations. Costs are elements times an
# algorithm-bandwidth factor, with $(n-1)/n$ approximated as 1. "Split Dim" is the dimension
# cut, for the sequence-parallel part and for the rest. In the memory columns, P/G are the fp16
# parameters and gradients, OS the optimizer states and A the peak activations:

# %% [markdown]
# **Communication** (Table 2 of Fang & Zhao 2024, arXiv 2405.07719 v5)
#
# |  | Param | Param cost | Act | Act cost |
# |---|---|---|---|---|
# | SP-Ulysses | allreduce | 12O(d²) | 8\*all2all | (8/N)·O(bs\*L\*d) |
# | SP-Ring | allreduce | 12O(d²) | P2P | 4O(bs\*L\*d) |
# | DP | allreduce | 12O(d²) | 0 | 0 |
# | ZeRO1 | allgather+reducescatter | 12O(d²) | 0 | 0 |
# | SP-Unified+ZeRO1 | allgather+reducescatter | 12O(d²) | P2P+8\*all2all | ≤4O(bs\*L\*d) |
# | SP-Unified+ZeRO2 | allgather+reducescatter | 12O(d²) | P2P+8\*all2all | ≤4O(bs\*L\*d) |
# | SP-Unified+ZeRO3 | 2\*allgather+reducescatter | 18O(d²) | P2P+8\*all2all | ≤4O(bs\*L\*d) |
# | TP | 0 | 0 | 4\*allreduce | 8O(bs\*L\*d) |
# | TP-sp | 0 | 0 | 6\*allgather+4\*reducescatter | 10O(bs\*L\*d) |
#
# **Split dimension and memory** (the same table's other columns)
#
# |  | Split Dim | P/G | OS | Act |
# |---|---|---|---|---|
# | SP-Ulysses | hc/L | P+G | 6P | A/N |
# | SP-Ring | L/L | P+G | 6P | A/N |
# | DP | bs/bs | P+G | 6P | A/N |
# | ZeRO1 | hc/L | P+G | 6P/N | A/N |
# | SP-Unified+ZeRO1 | hc/L | P+G | 6P/N | A/N |
# | SP-Unified+ZeRO2 | hc/L | P+G/N | 6P/N | A/N |
# | SP-Unified+ZeRO3 | hc/L | (P+G)/N | 6P/N | A/N |
# | TP | hc/d | (P+G)/N | 6P/N | αA |
# | TP-sp | hc/d | (P+G)/N | 6P/N | A/N |

# %% [markdown]
# The May 2024 tech report (v1) printed different Act costs: SP-Ulysses $8O(bs \cdot L \cdot d)$
# (by our arithmetic, the whole group's traffic rather than one device's) and SP-Ring "Overlap".
#
# sptutor implements only the attention part: the "Act" column of the SP rows, and the activation
# memory A kept for attention's backward. To translate: $bs \to B$, $L \to S$, $N \to W$,
# $hc \to Hq$, and the hidden size $d \to Hq \cdot D$. The ledger counts bytes, so we divide by
# the bytes of one $(B, S, Hq, D)$ tensor to get the paper's unit, $O(bs \cdot L \cdot d)$.
# For multi-head attention (Hkv = Hq) in float32, with forward and backward together per rank:
#
# * Ulysses sends four all-to-alls per phase, each putting $(W-1)/W$ of a $(B, S/W, H, D)$ tensor
#   on the wire: $8\,\frac{W-1}{W}\cdot\frac{1}{W}$, the paper's $8/N$ before rounding
#   $(N-1)/N$ to 1;
# * the ring sends K and V over $W-1$ hops forward and again backward, plus the dK, dV
#   accumulators over $W$ hops: $4\,\frac{W-1}{W} + 2$;
# * saved activations per rank are $O(S/W)$: going from 1 rank to W divides them by exactly W,
#   the paper's $A/N$.

# %%
B, S, Hq, D = 1, 64, 4, 8
q, k, v, dout = random_inputs(B, S, Hq, Hq, D, dtype=torch.float32)
unit = B * S * Hq * D * q.element_size()  # bytes of one (B, S, Hq, D) tensor: O(bs·L·d)
paper = {"ulysses": "(8/N)", "ring": "4", "usp": "≤ 4"}
ours_formula = {
    "ulysses": 8 * (W - 1) / W / W,
    "ring": 4 * (W - 1) / W + 2,
    "usp": None,  # between the two: printed, and checked to lie between them
}
measured = {}
print(f"W = {W}, MHA, float32; per rank, forward + backward,")
print("in units of B·S·Hq·D elements (the paper's O(bs·L·d))\n")
print(f"{'method':<16} {'paper':>6} {'ours':>6}   saved·W / saved at W=1")
for method, options in (("ulysses", {}), ("ring", {}), ("usp", {"ulysses": U})):
    sim = oracle.simulate(method, q, k, v, dout, world=W, **options)
    measured[method] = max(sim.ledger.bytes_sent(r) for r in range(W)) / unit
    if ours_formula[method] is not None:
        assert measured[method] == ours_formula[method]
    alone = cost.of(method, cost.Shape.of(q, k), 1, ulysses=1 if method == "usp" else None)
    memory_ratio = max(r.saved_bytes for r in sim.ranks) * W / alone.saved[0]
    assert memory_ratio == 1.0  # saved activations per rank: exactly A/W
    name = f"{method} (U={U}, R={R})" if method == "usp" else method
    print(f"{name:<16} {paper[method]:>6} {measured[method]:>6.3f}   {memory_ratio:.2f}")
assert measured["ulysses"] < measured["usp"] < measured["ring"]

# %% [markdown]
# Ulysses agrees with the paper, and USP lies between its two parts. The ring does not agree:
# the paper's 4 does not say what it counts. 4 = 2 + 2 is one pass of K, V and one of dK, dV.
# Our schedule passes K and V around a second time in backward (instead of keeping every block
# from the forward) and adds one hop to bring the accumulators home, so it sends about 6 as W
# grows. The
# paper's "≤ 4" for the unified rows inherits that count.
#
# Under GQA, with $G = Hq/Hkv$ query heads per K/V head, the paper (v5) gives the Ulysses
# activation cost as $(4/N)\cdot O(bs\cdot L\cdot d) + (4/N)\cdot O(bs\cdot L\cdot d/G)$: Q and O
# keep their size, while K and V shrink by G. It also says the ring, which sends only K and V,
# drops by $1/G$. We check both on the ledger, with G = 4 and enough K/V heads for every rank
# (Hkv ≥ W, so none is replicated):

# %%
B, S, Hq, Hkv, D = 1, 32, 16, 4, 4
G = Hq // Hkv
q, k, v, dout = random_inputs(B, S, Hq, Hkv, D, dtype=torch.float32)
_, k_mha, v_mha, _ = random_inputs(B, S, Hq, Hq, D, dtype=torch.float32)
unit = B * S * Hq * D * q.element_size()
ulysses_gqa = oracle.simulate("ulysses", q, k, v, dout, world=W).ledger.bytes_sent(0) / unit
paper_form = (W - 1) / W * (4 / W + 4 / W / G)  # the paper's formula, before rounding (W-1)/W
assert ulysses_gqa == paper_form
ring_gqa = oracle.simulate("ring", q, k, v, dout, world=W).ledger.bytes_sent(0)
ring_mha = oracle.simulate("ring", q, k_mha, v_mha, dout, world=W).ledger.bytes_sent(0)
assert ring_gqa * G == ring_mha
print(f"G = {G}: Ulysses sends {ulysses_gqa:.4f} x B·S·Hq·D elements per rank,")
print("  = (W-1)/W·(4/W + 4/(W·G)): the paper's, before rounding (W-1)/W")
print(f"  the ring sends {ring_gqa:,} bytes per rank, 1/{ring_mha // ring_gqa} of MHA's")

# %% [markdown]
# ## The paper's tips, checked
#
# Section 5 of the paper closes with best practices. Three of them are about sequence parallelism
# itself, and the text on GQA adds a fourth (quoted in substance from v5):
#
# * **Tip 1.** Use unified SP in place of SP-Ring and SP-Ulysses. It covers both
#   (ulysses_degree = N is Ulysses, ring_degree = N is Ring), removes the head limit, and is
#   robust to heterogeneous networks: all-to-all on the fast links, P2P on the slow ones.
# * **Tip 6.** Use a high SP degree, with a large ring degree when there are few heads.
# * **Tip 7.** Order the mesh from low to high as TP, SP-Ulysses, SP-Ring, ZeRO-DP, PP: the
#   bandwidth-hungry all-to-all on the inner dimension.
# * **On GQA** (§3): the Ulysses degree is at most the number of heads, so with GQA the K/V heads
#   bind. "If MQA is used and KV head number is 1, DS-Ulysses will not function."
#
# The other tips concern ZeRO, tensor and pipeline parallelism, which sptutor does not
# implement. We quote them only. Tip 2: prefer DP over SP when the batch is large enough to split.
# Tip 3: always use SP with ZeRO-1/2, over the combined SP×DP group. Tip 4: SP beats TP(-sp) in
# communication, and GQA lowers SP's cost but not TP's. Tip 5: switching from TP-sp to SP does not
# lengthen the trainable sequence, and SP with ZeRO-3 reaches about the same length as TP-sp.
#
# What we can measure is bytes, balance and which configurations run, not time. First the head
# limit and the mesh:

# %%
q, k, v, dout = random_inputs(1, 16, 2, 2, 8)  # Hq = 2 heads, W = 4 ranks
try:
    oracle.simulate("ulysses", q, k, v, world=W)
    raise AssertionError("Ulysses should refuse 4 ranks for 2 heads")
except ValueError as error:
    print(f"ulysses, Hq=2, W=4: ValueError:\n  {error}")
sim = oracle.simulate("usp", q, k, v, dout, world=W, ulysses=2, layout="zigzag", causal=True)
reference, _ = oracle.full_attention(q, k, v, causal=True)
assert relative_error(sim.out, reference) < 1e-12
usp_error = relative_error(sim.out, reference)
print(f"usp U=2, R=2, same heads: error vs full attention {usp_error:.0e}")

all_to_all_groups = sorted({e.group for e in sim.ledger.messages() if e.op == "all_to_all"})
send_groups = sorted({e.group for e in sim.ledger.messages() if e.op == "send"})
assert all_to_all_groups == [(0, 1), (2, 3)] and send_groups == [(0, 2), (1, 3)]
print(f"all-to-alls in groups {all_to_all_groups} (contiguous ranks)")
print(f"sends in groups {send_groups} (strided ranks)")

# %% [markdown]
# MQA (Hkv = 1): sptutor's Ulysses does run. It replicates each K/V head U/Hkv times before the
# all-to-all and sums the replicas' gradients after. The price is in the ledger: the K all-to-all
# carries U heads where it could carry one.

# %%
q, k, v, dout = random_inputs(1, 16, 4, 1, 8)
sim = oracle.simulate("ulysses", q, k, v, dout, world=W)
reference, _ = oracle.full_attention(q, k, v)
assert relative_error(sim.out, reference) < 1e-12
q_all_to_all, k_all_to_all = (e.nbytes for e in sim.ledger.messages(0)[:2])
assert q_all_to_all == k_all_to_all  # K went out with Hq = W = 4 heads, like Q, not with Hkv = 1
print(f"MQA on W = 4: q all-to-all {q_all_to_all} bytes, k all-to-all {k_all_to_all} bytes")
print(f"(the one K/V head replicated {W}x)")

# %% [markdown]
# Tip 6 at a realistic size, B = 1, S = 32768, Hq = 32, Hkv = 8, D = 128, bf16 (Llama3-8B's
# heads). The numbers are bytes per rank, forward plus backward, from `sptutor.cost`, the closed
# forms the ledger matched above. USP takes U = min(W, Hkv), so no K/V head is replicated.

# %%
shape = cost.Shape(1, 32768, 32, 8, 128, torch.bfloat16)
MiB = 2**20


def sent_and_saved(method, world, degree=None):
    """(MiB sent per rank, forward + backward; MiB saved for backward per rank) from the cost."""
    c = cost.of(method, shape, world, ulysses=degree)
    return (c.forward[0] + c.backward[0]) / MiB, c.saved[0] / MiB


worlds = (2, 4, 8, 16, 32, 64)
print("MiB sent / MiB saved for backward, per rank")
print(f"{'W':>3}  {'ring':<14} {'ulysses':<14} {'usp':<14} (U, R)")
table = {}
for world in worlds:
    degree = min(world, shape.heads_kv)
    ring_cost = sent_and_saved("ring", world)
    ulysses_cost = sent_and_saved("ulysses", world) if world <= shape.heads_q else None
    usp_cost = sent_and_saved("usp", world, degree)
    table[world] = ring_cost, ulysses_cost, usp_cost
    ulysses_text = (
        f"{ulysses_cost[0]:6.1f}/{ulysses_cost[1]:5.1f}" if ulysses_cost else "needs Hq >= W"
    )
    ring_text, usp_text = (f"{a:6.1f}/{b:5.1f}" for a, b in (ring_cost, usp_cost))
    mesh_text = f"({degree}, {world // degree})"
    print(f"{world:>3}  {ring_text:<14} {ulysses_text:<14} {usp_text:<14} {mesh_text}")
# Ulysses' bytes per rank fall with W; the ring's rise towards a constant: K, V twice in bf16
# and dK, dV once in float32, (4·2 + 2·4)·B·S·Hkv·D bytes
assert all(table[a][1][0] > table[b][1][0] for a, b in itertools.pairwise(worlds[:5]))
assert all(table[a][0][0] < table[b][0][0] for a, b in itertools.pairwise(worlds))
# wherever Ulysses runs it sends no more than USP; beyond Hkv ranks it keeps more for backward
assert all(table[w][1][0] <= table[w][2][0] for w in worlds if table[w][1])
assert table[16][1][1] > table[16][2][1] and table[32][1][1] > table[32][2][1]
ring_limit = (4 * 2 + 2 * 4) * shape.tokens_bytes(shape.seq_len, shape.heads_kv, 1) / MiB
assert all(table[w][0][0] < ring_limit for w in worlds)
# the ring's and USP's saved bytes per rank halve when W doubles
assert all(table[a][0][1] == 2 * table[b][0][1] for a, b in itertools.pairwise(worlds))
assert all(table[a][2][1] == 2 * table[b][2][1] for a, b in itertools.pairwise(worlds))

# %% [markdown]
# The bytes agree with tip 6 only in part. A high degree helps memory (saved per rank halves
# with every doubling of W for the ring and USP), and Ulysses' traffic falls with W, while the
# ring's does not. But wherever Ulysses is allowed (W ≤ Hq here), it sends no more bytes than
# USP, replicas and all: the same up to W = Hkv, where USP is Ulysses, and fewer beyond. What
# it pays beyond Hkv ranks is memory: each rank keeps the replicated K/V heads for backward.
# A large ring degree is *needed* when W exceeds the heads (W = 64 here). The paper prefers it
# for what bytes don't show: the ring's P2P messages overlap with compute and tolerate slow
# links, while all-to-alls do not. That is tip 1's point about heterogeneous networks, a claim
# about time that this CPU emulation cannot check.
#
# Load balance is something we can measure. The paper's Figure 3 says that with an even,
# contiguous split of a causal sequence over 4 GPUs, "GPU3's load is nearly 7× GPU0's", and its
# load-balanced ring (zigzag) fixes this. We count useful multiply-adds per rank of the ring over
# 4 ranks:

# %%
ratios = {}
for S in (16, 64, 256):
    q, k, v, _ = random_inputs(1, S, 1, 1, 4)
    for lay in ("contiguous", "zigzag"):
        sim = oracle.simulate("ring", q, k, v, world=W, causal=True, layout=lay)
        macs = [sim.ledger.macs(rank) for rank in range(W)]
        ratios[S, lay] = max(macs) / min(macs)
    print(
        f"S = {S:>3}: max/min useful MACs per rank, contiguous {ratios[S, 'contiguous']:.2f}, "
        f"zigzag {ratios[S, 'zigzag']:.2f}"
    )
contiguous = [ratios[S, "contiguous"] for S in (16, 64, 256)]
assert contiguous == sorted(contiguous) and 6.8 < contiguous[-1] < 7  # rising towards 7
assert all(ratios[S, "zigzag"] == 1.0 for S in (16, 64, 256))

# %% [markdown]
# The contiguous ratio rises towards 7 as S/W grows: the last rank computes three full blocks
# and one triangle, the first rank one triangle, and a triangle is about half a block.
#
# The paper's attention-only benchmarks (its Tables 3 and 4, on 8×L20 over PCIe and 8×A100
# over NVLink) measure iterations per second. The best split there depends on the network and
# the sequence length, and the text and tables do not always name the same winner. A CPU
# emulation has no time to compare, so we report none.

# %% [markdown]
# ## The real thing on 4 processes
#
# `sptutor.testing.check_sptutor` runs sptutor's own `usp_attention` on 4 gloo processes (one
# `sptutor.launch.Pool`, started once) over a sweep of cases that hypothesis draws: W = 1 to 4, on
# the first W processes, and for each W a Ulysses degree U among its divisors, so the sweep holds
# the ring (U = 1), Ulysses (U = W) and a true 2-D mesh (U = 2, R = 2 on 4 ranks); the three
# layouts; causal or not; GQA; odd head dims; float64 and float32. For each case every process
# builds the U × R mesh (`make_usp_mesh`, collectively), takes its shards as
# `layout.shard(..., ulysses=U)` cuts them, and runs forward and backward; each rank's out, dq, dk
# and dv are compared with `oracle.simulate` at the tolerance of the case's dtype (the LSE column
# stays empty: as in Ulysses, it would cost one more all-to-all). That numerical verdict is all that
# [chapter 8, *Checking your own code*](08_checking_your_code.py) asks of your code, through the
# same machinery (`sptutor.testing.check`). Here the code is sptutor's own, so
# `enforce=("messages", "saved")` also fails a case unless every rank logged exactly the oracle's
# messages (op, rank, peer, bytes, phase and step, in order) and kept exactly the oracle's bytes for
# backward.

# %%
POOL = launch.Pool(4, timeout=60)  # 4 gloo processes, started once
EXAMPLES = 10
# check_real: check_sptutor(method, world=4, dtypes=("float64", "float32"), enforce=("messages",
# "saved"), pool=...), its report printed, passed and messages_exact asserted
report = check_real("usp", POOL, examples=EXAMPLES, layouts=layout.LAYOUTS, causal=(False, True))
POOL.close()
multi_rank = report.on_several_ranks
meshes = {
    "ring (U = 1)": [r.case for r in multi_rank if r.case.ulysses == 1],
    "Ulysses (U = W)": [r.case for r in multi_rank if r.case.ulysses == r.case.world],
    "2-D (1 < U < W)": [r.case for r in multi_rank if 1 < r.case.ulysses < r.case.world],
}
for name, cases in meshes.items():
    assert cases, name  # the sweep ran every shape of mesh
    print(f"{name:<16} W = {sorted({c.world for c in cases})}, {len(cases)} of the cases")

# %% [markdown]
# <div class="admonition note"><p class="admonition-title">What the paper claims, what we
# measured</p>
# <p><b>Claim</b> (Fang &amp; Zhao 2024, tip 1): unified SP covers SP-Ulysses (ulysses_degree =
# N) and SP-Ring (ring_degree = N). <b>Measured:</b> message-for-message ledger equality for
# every layout, causal or not. The tokens match Ulysses' only under the contiguous layout.</p>
# <p><b>Claim</b> (Table 2, v5): SP-Ulysses sends (8/N)·O(bs·L·d) per block, SP-Ring
# 4·O(bs·L·d), unified ≤ 4·O(bs·L·d), and all keep A/N of the activations. <b>Measured:</b> the
# Ulysses figure exactly, up to the (N−1)/N the paper rounds away. Our ring sends more than 4,
# because it passes K and V twice. USP lies between its parts. Saved activations are exactly 1/W
# (see the cost table above).</p>
# <p><b>Claim</b> (§3, v5): under GQA, Ulysses costs (4/N)·O(bs·L·d) + (4/N)·O(bs·L·d/G) and the
# ring 1/G of its MHA cost. <b>Measured:</b> both exactly on the ledger.</p>
# <p><b>Claim</b> (§3): the Ulysses degree is at most the number of heads, and DS-Ulysses does
# not function under MQA. <b>Measured:</b> sptutor's Ulysses refuses 4 ranks for 2 heads, and
# USP runs there. Under MQA our Ulysses runs by replicating the K/V head, at a cost in bytes and
# memory.</p>
# <p><b>Claim</b> (Figure 3): contiguous causal load on 4 GPUs, "GPU3's load is nearly 7×
# GPU0's"; the load-balanced ring evens it out. <b>Measured:</b> the ratio approaches 7 as S/W
# grows, and zigzag gives exactly 1 (see the MACs cells above).</p>
# <p><b>Not measured:</b> throughput (Tables 3–7) and the benefit of placing all-to-alls on fast
# links. Those are claims about time and networks.</p>
# </div>
#
# API: [sptutor.usp](../api/usp.md), [sptutor.mesh](../api/mesh.md), the emulation
# [sptutor.oracle.usp](../api/oracle-usp.md), and the closed forms
# [sptutor.cost](../api/cost.md).

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercise `usp` blanks USP's forward and backward: Ulysses inside, the
# ring across, and the grader compares every shard and message with the oracle and explains the
# first mistake in one sentence ([Exercises](../exercises.md)).
# The emulated twin (`oracle_...`) needs no processes; the real one runs on 4:
#
# ```bash
#     sptutor exercise oracle_usp && sptutor grade oracle_usp.py
#     sptutor exercise usp && sptutor grade usp.py
# ```
