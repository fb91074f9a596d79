# %% [markdown]
# # 1. Ring Self-Attention
#
# Li, Xue, Baranwal, Li and You, *Sequence Parallelism: Long Sequence Training from System
# Perspective* (arXiv 2105.13120, 2021; ACL 2023), is the oldest of sptutor's papers. Every
# device holds the **whole model** and only a piece of the **sequence**. Attention is the one
# layer that needs the other pieces: each query must see every key. The paper's **Ring
# Self-Attention** (RSA) passes them around a ring of devices:
#
# 1. a **ring of keys**: each rank fills the full score rows of its own queries against all S
#    keys, one block per hop;
# 2. a **softmax over the whole row**, done locally, since the row is complete;
# 3. a **ring of values**: each rank adds up its probabilities times every block of values.
#
# Nothing is approximate and no online softmax is needed, because the full row is there. The price
# is memory: each rank keeps its `(S/W) × S` score rows, which is $O(S^2/W)$. This chapter builds
# RSA in the oracle, checks it against full attention, draws its schedule, sets the paper's
# communication and memory formulas against the ledger and the bytes kept for backward, and runs
# the real code on 4 processes.

# %% tags=["hide-input"]

import matplotlib.pyplot as plt
import torch

import sptutor
from sptutor import cost, launch, layout, ledger, oracle, plots, rows
from sptutor import rsa as real_rsa
from sptutor.ledger import wire_bytes
from sptutor.notebook import check_real, show
from sptutor.oracle import rsa as oracle_rsa
from sptutor.testing import relative_error

_ = torch.manual_seed(0)  # seeded: every number below is reproducible

# %% [markdown]
# ## The paper's letters and ours
#
# The paper writes B for the batch, L for the sequence length, N for the number of devices, Z for
# the number of heads, A for the head size and H = Z·A for the hidden size. Device n holds chunk n
# of the sequence, $Q^n, K^n, V^n$ of shape (B, Z, L/N, A). In sptutor's one alphabet:
#
# | paper | meaning | sptutor |
# |---|---|---|
# | B | batch | B |
# | L | sequence length | S |
# | N | devices | W |
# | Z | heads | Hq (and Hkv = Hq: the paper treats multi-head attention) |
# | A | head size | D |
# | H = Z·A | hidden size | Hq·D |
#
# Rank r holds `q: (B, S/W, Hq, D)` and `k, v: (B, S/W, Hkv, D)`, sequence before heads. The paper
# treats bidirectional attention only; causal masks (from global positions) and GQA are ours.

# %% [markdown]
# ## Forward: a ring of keys, a full-row softmax, a ring of values
#
# At step $t = 0, \dots, W-1$ rank r holds the keys of rank $\text{src} = (r - t) \bmod W$ and
# fills that block of its score rows:
#
# $$S^r_{[:,\ \text{block(src)}]} = \text{scale}\cdot Q^r K_{\text{src}}^\top, \qquad
# S^r \in \mathbb{R}^{(S/W) \times S} \text{ per batch row and head.}$$
#
# With the row complete, the softmax is the ordinary one, $P^r = \exp(S^r - \text{lse}^r)$, and the
# ring of values computes the paper's eq. (4), a sum over the W column blocks:
#
# $$O^r = P^r V = \sum_{\text{src}=0}^{W-1} P^r_{[:,\ \text{block(src)}]}\, V_{\text{src}} .$$
#
# Here is the oracle's forward, every rank in one loop (`k[rank]`, `world.ring_shift`,
# `world.compute` logging the useful multiply-adds):

# %% tags=["hide-input"]
show(oracle_rsa._forward)

# %% [markdown]
# and the real code's, one process per rank on `torch.distributed` (`comm.ring_shift` starts the
# hop before the block's compute, so the two overlap). The steps, the names and the order of
# messages are the same:

# %% tags=["hide-input"]
show(real_rsa._forward)

# %% [markdown]
# Both call the same full-row maths in `sptutor.rows`; the softmax over a whole row is three lines
# (a row that sees no key gets P = 0):

# %% tags=["hide-input"]
show(rows.softmax)

# %% [markdown]
# ## An emulated run, checked against full attention
#
# `oracle.simulate` shards full inputs over W emulated ranks, runs the method's steps and glues
# the results back. In float64 RSA must equal plain full attention to rounding (the tolerance is
# $10^{-10}$ relative), bidirectional as in the paper and causal as we added:

# %%
B, S, H, D, W = 1, 16, 2, 8, 4
q, k, v, dout = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(4))


def full_attention_grads(causal: bool):
    """out, lse and dq, dk, dv of plain full attention (autograd through the ground truth)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = oracle.full_attention(*leaves, causal=causal)
    out.backward(dout)
    return out.detach(), lse, *(x.grad for x in leaves)


for causal in (False, True):
    sim = oracle.simulate("rsa", q, k, v, dout, world=W, causal=causal)
    truth = full_attention_grads(causal)
    names = ("out", "lse", "dq", "dk", "dv")
    errors = [relative_error(getattr(sim, name), t) for name, t in zip(names, truth)]
    assert max(errors) < 1e-10, errors
    print(f"causal={causal!s:5}: worst relative error of out, lse, dq, dk, dv = {max(errors):.1e}")

# %% [markdown]
# Every message the emulated ranks sent is in the ledger (logged by the sender), with the useful
# multiply-adds of every block. The bidirectional call, per rank and phase:

# %%
sim = oracle.simulate("rsa", q, k, v, dout, world=W)
print(sim.ledger.summary())

# %% [markdown]
# ## Pictures of the call
#
# The schedule: ranks are lanes, each rank's events in its own order. In forward, the W−1 sends
# of the ring of keys, then the W−1 sends of the ring of values; in backward the two all-reduces
# (grey bands) and the two rings again. A box is a block computed, shaded by its useful
# multiply-adds and numbered by whose K/V block it used. (This is the causal call: rank 0 sees
# only its own block, so it idles while the blocks pass through.)

# %%
causal_sim = oracle.simulate("rsa", q, k, v, dout, world=W, causal=True)
plots.schedule(causal_sim)
plt.show()

# %% [markdown]
# Who computes which (query, key) pair: each query row belongs to the rank that owns the query,
# and each tile carries the ring step at which it was filled. Masked pairs stay white; RSA still
# sends every block around the whole ring.

# %%
plots.ownership(causal_sim)
plt.show()

# %% [markdown]
# ## Backward: two rings and two all-reduces
#
# The paper only summarises its backward (§3.2.2: "two all-reduce collective communication and
# two ring-style P2P communication"); its Colossal-AI code (`RingAV.backward`, then
# `RingQK.backward`) spells it out, and sptutor follows it:
#
# $$dV = \textstyle\sum_r (P^r)^\top dO^r, \qquad
# dP^r_{[:,\ \text{block(src)}]} = dO^r V_{\text{src}}^\top,$$
#
# $$dS^r = P^r \odot \big(dP^r - \text{rowsum}(P^r \odot dP^r)\big)
# \quad\text{(the softmax backward on full rows),}$$
#
# $$dK = \text{scale}\cdot \textstyle\sum_r (dS^r)^\top Q^r, \qquad
# dQ^r = \text{scale}\cdot\textstyle\sum_{\text{src}}
# dS^r_{[:,\ \text{block(src)}]}\, K_{\text{src}} .$$
#
# $(P^r)^\top dO^r$ is rank r's share of the gradient of **every** value, a full-length
# `(B, S, Hkv, D)` tensor; summing the shares over ranks is an all-reduce, after which each rank
# keeps its own rows. The same goes for dK. dP needs V again and dQ needs K again, so V and K travel
# the ring a second time (re-sent, not stored). In the oracle:

# %% tags=["hide-input"]
show(oracle_rsa._all_reduced_key_gradient)

# %% [markdown]
# and in the real code, the same step with one `comm.all_reduce`:

# %% tags=["hide-input"]
show(real_rsa._all_reduced_key_gradient)

# %% [markdown]
# The rings of the backward have the forward's shape (`show(oracle_rsa._backward)` prints them).
# Where the paper leaves room, sptutor chose: all-reduce then keep own rows, as the paper does (a
# reduce-scatter would do); P stored in the inputs' dtype, as the paper's code stores its softmax;
# no division of dQ, dK, dV by W (Colossal-AI's scaling, tied to its own gradient averaging: we
# return the true gradients). Per rank, the backward's messages are exactly two all-reduces and
# 2(W−1) sends:

# %%
backward_ops = [e.op for e in sim.ledger.messages(0) if e.phase == "backward"]
assert backward_ops.count("all_reduce") == 2 and backward_ops.count("send") == 2 * (W - 1)
assert len(backward_ops) == 2 + 2 * (W - 1)
print("rank 0, backward:", " ".join(backward_ops))

# %% [markdown]
# ## Communication: the paper's formula against the ledger
#
# The paper (§3.2.1–3.2.2) counts, per device and attention layer, $2(N-1)\cdot B\,Z\,(L/N)\,A$
# elements in forward (two ring passes) and $6(N-1)\cdot B\,Z\,(L/N)\,A$ in backward (two ring
# passes and two all-reduces of a full-length tensor, each $2\frac{N-1}{N}\,B\,Z\,L\,A$), in all
#
# $$8(N-1)\cdot B\cdot Z\cdot \tfrac{L}{N}\cdot A
# \;=\; 8(W-1)\cdot B\cdot \tfrac{S}{W}\cdot H\cdot D \text{ elements}$$
#
# in our letters, H = Hq = Hkv for multi-head attention. The paper also notes that Megatron's tensor
# parallelism moves the same total. sptutor's ledger counts what each rank puts on the wire under
# the bandwidth-optimal algorithm of each collective. For float32 and float64 multi-head attention
# it must equal the paper's formula **exactly**, for every rank and world size:

# %%
print(f"{'dtype':8} {'W':>2} {'S':>3} {'paper, bytes':>13} {'ledger, every rank':>19}")
for dtype in (torch.float32, torch.float64):
    for world in (2, 3, 4):
        S_case = 24  # divisible by 2, 3 and 4
        x = [torch.randn(B, S_case, H, D, dtype=dtype) for _ in range(4)]
        case = oracle.simulate("rsa", *x, world=world)
        elements = B * (S_case // world) * H * D  # B·(S/W)·H·D
        paper = 8 * (world - 1) * elements * dtype.itemsize
        for rank in range(world):
            assert case.ledger.bytes_sent(rank=rank) == paper
            assert case.ledger.bytes_sent(rank=rank, phase="forward") == paper // 4  # 2(W-1)
            assert case.ledger.bytes_sent(rank=rank, phase="backward") == 3 * paper // 4  # 6(W-1)
        assert cost.rsa(cost.Shape(B, S_case, H, H, D, dtype), world).forward[0] == paper // 4
        sent = case.ledger.bytes_sent(rank=0)
        print(f"{str(dtype)[6:]:8} {world:>2} {S_case:>3} {paper:>13,} {sent:>19,}")

# %% [markdown]
# Outside that case the ledger and the formula part, for two reasons `sptutor.cost.rsa` spells
# out: with 16-bit inputs the all-reduced gradients travel in float32 (twice the paper's bytes for
# those two messages), and under GQA the keys and values have Hkv < Hq heads (fewer bytes than the
# paper's Z = Hq). And the all-reduce followed by "keep own rows" could be a reduce-scatter, which
# puts half the bytes on the wire:

# %%
for dtype, heads_q, heads_kv in ((torch.float16, 2, 2), (torch.float32, 4, 2)):
    qx = torch.randn(B, S, heads_q, D).to(dtype)
    kx, vx = (torch.randn(B, S, heads_kv, D).to(dtype) for _ in range(2))
    case = oracle.simulate("rsa", qx, kx, vx, torch.randn_like(qx), world=W)
    paper = 8 * (W - 1) * B * (S // W) * heads_q * D * dtype.itemsize  # Z = Hq in the paper
    expected = cost.rsa(cost.Shape.of(qx, kx), W)
    ledger_bytes = case.ledger.bytes_sent(rank=0)
    assert ledger_bytes == expected.forward[0] + expected.backward[0] != paper
    print(f"{str(dtype)[6:]}, Hq={heads_q}, Hkv={heads_kv}: ledger {ledger_bytes:,} B "
          f"(= cost.rsa), formula {paper:,} B")  # fmt: skip
gradient_bytes = B * S * H * D * 8  # one full-length (B, S, Hkv, D) float64 gradient
all_reduce = wire_bytes("all_reduce", gradient_bytes, W)
reduce_scatter = wire_bytes("reduce_scatter", gradient_bytes // W, W)  # output: own rows
assert 2 * reduce_scatter == all_reduce
print(f"one full-length dK: all-reduce {all_reduce:,} B/rank, reduce-scatter {reduce_scatter:,} B")

# %% [markdown]
# ## Memory: RSA against tensor parallelism
#
# The paper's memory model (its Tables 1–2, Adam as in Megatron) counts the elements each device
# keeps for one layer. For multi-head attention, tensor parallelism (Megatron) against sequence
# parallelism (RSA):
#
# $$M^{\text{attn}}_{\text{TP}} = \frac{16AZH}{N} + \frac{4BLZA}{N} + \frac{BZL^2}{N} + BLH,$$
#
# $$M^{\text{attn}}_{\text{SP}} = 16AZH + \frac{4BZLA}{N} + \frac{BZL^2}{N} + \frac{BLH}{N},$$
#
# and for the MLP,
#
# $$M^{\text{MLP}}_{\text{TP}} = \frac{32H^2}{N} + \frac{4BLH}{N} + BLH, \qquad
# M^{\text{MLP}}_{\text{SP}} = 32H^2 + \frac{5BLH}{N},$$
#
# so RSA needs less than tensor parallelism when $BL > 16AZ$ (attention) and $BL > 32H$ (MLP):
# tensor parallelism splits the weights (the $AZH$ and $H^2$ terms) but keeps the layer's input
# whole on every device ($BLH$), sequence parallelism replicates the weights and splits everything
# that grows with L. We read the attention terms as: $BZL^2/N$ the score rows, $4BZLA/N$ Q, K, V and
# the attention output. What `rsa_attention` itself keeps for backward (its q, k, v shards and P)
# is measured by the oracle (`sim.ranks[r].saved_bytes`) and given in closed form by
# `sptutor.cost.rsa`; it must be exactly the paper's $3BZLA/N + BZL^2/N$ (the fourth $BZLA/N$, the
# attention output, is what the output projection that follows keeps, outside attention).
#
# A tiny model, every element counted as 4 bytes (float32): B = 4, Z = Hq = 4 heads of A = D = 8,
# so H = 32 and the crossover $BL > 16AZ$ is at S = 128. Tensor parallelism cannot split 4 heads
# over more than 4 ranks, so it has no W = 8 entry. The RSA column is the paper's weight and input
# terms plus our measured bytes:

# %%
MB, MZ, MA = 4, 4, 8  # B, Z = Hq = Hkv, A = D of the memory model
MH = MZ * MA  # hidden size H = Z·A
ITEM = 4  # float32


def tp_bytes(L: int, N: int) -> int:
    """Tensor parallelism, multi-head attention (the paper's Tables 1–2), bytes per device."""
    weights, qkv_out, scores = 16 * MA * MZ * MH, 4 * MB * L * MZ * MA, MB * MZ * L * L
    return ITEM * (weights // N + qkv_out // N + scores // N + MB * L * MH)


def rsa_paper_bytes(L: int, N: int) -> int:
    """Sequence parallelism (RSA), multi-head attention (the paper's Tables 1–2), per device."""
    weights, qkv_out, scores = 16 * MA * MZ * MH, 4 * MB * MZ * L * MA, MB * MZ * L * L
    return ITEM * (weights + qkv_out // N + scores // N + MB * L * MH // N)


def rsa_measured_core(L: int, N: int) -> int:
    """What the oracle's RSA keeps for backward on rank 0 (q, k, v shards and P), forward only."""
    x = [torch.randn(MB, L, MZ, MA) for _ in range(3)]
    saved = {r.saved_bytes for r in oracle.simulate("rsa", *x, world=N).ranks}
    assert len(saved) == 1  # every rank keeps the same
    return saved.pop()


print(f"{'W':>2} {'S':>4} {'TP (paper)':>11} {'RSA (paper)':>12} {'RSA core, measured':>19}",
      f"{'smaller':>7}")  # fmt: skip
for N in (2, 4, 8):
    for L in (64, 128, 256, 512):
        core = rsa_measured_core(L, N)
        assert core == cost.rsa(cost.Shape(MB, L, MZ, MZ, MA), N).saved[0]
        assert core == ITEM * (3 * MB * MZ * L * MA // N + MB * MZ * L * L // N)  # 3BZLA/N + BZL²/N
        rsa = ITEM * (16 * MA * MZ * MH + MB * L * MH // N + MB * MZ * L * MA // N) + core
        assert rsa == rsa_paper_bytes(L, N)
        tp = tp_bytes(L, N) if N <= MZ else None
        if tp is not None:  # the paper's rule: RSA needs less exactly when BL > 16AZ
            assert (rsa < tp) == (MB * L > 16 * MA * MZ) and (rsa == tp) == (MB * L == 16 * MA * MZ)
        smaller = "-" if tp is None else "RSA" if rsa < tp else "TP" if tp < rsa else "equal"
        tp_text = "-" if tp is None else f"{tp:,}"
        print(f"{N:>2} {L:>4} {tp_text:>11} {rsa:>12,} {core:>19,} {smaller:>7}")

# %% [markdown]
# The score rows dominate both columns at these sizes, so the two stay close at a fixed W; the
# difference is *how far W can go*. Give every device the same budget and ask for the longest
# sequence (a multiple of 16) that fits: tensor parallelism stops improving at W = Z = 4, RSA keeps
# dividing the sequence.

# %%
BUDGET = 4 * 2**20  # 4 MiB per device


def longest(bytes_of, N: int) -> int:
    """The longest L (a multiple of 16 and of N) whose per-device bytes fit the budget."""
    fits = [L for L in range(16, 4097, 16) if L % N == 0 and bytes_of(L, N) <= BUDGET]
    return max(fits, default=0)


longest_tp = {N: longest(tp_bytes, min(N, MZ)) for N in (1, 2, 4, 8, 16)}  # TP: at most Z ranks
longest_rsa = {N: longest(rsa_paper_bytes, N) for N in (1, 2, 4, 8, 16)}
print(f"{'W':>2} {'longest S, TP':>14} {'longest S, RSA':>15}")
for N in longest_tp:
    print(f"{N:>2} {longest_tp[N]:>14} {longest_rsa[N]:>15}")
assert longest_tp[16] == longest_tp[4] < longest_rsa[8] < longest_rsa[16]
assert all(longest_rsa[N] >= longest_tp[N] for N in (4, 8, 16))

# %% [markdown]
# ## The real code on 4 processes
#
# `sptutor.rsa_attention` is the per-rank code: each process calls it with its own shards, as
# `sptutor.layout.shard` cuts them. `sptutor.launch.Pool` starts 4 gloo processes on this CPU once,
# for every task of this section; a task is a function run on every rank (it is shipped by value,
# so a function defined in a notebook works). Here is one call by hand, causal under the zigzag
# layout, in float64. Each rank records its messages (`ledger.record()`) and counts the bytes
# autograd keeps for backward (`saved_tensors_hooks`):

# %%
POOL = launch.Pool(W, timeout=60)  # the section's 4 processes, started once


def rsa_on_rank(rank, world, q, k, v, dout):
    """Causal zigzag rsa_attention, forward and backward, on this rank's shards: its output,
    its messages and the bytes autograd saved for backward."""
    q_shard, k_shard, v_shard, dout_shard = (
        layout.shard(x, world=world, layout="zigzag")[rank] for x in (q, k, v, dout)
    )
    leaves = [x.requires_grad_() for x in (q_shard, k_shard, v_shard)]
    saved = []

    def count(x):
        saved.append(x.numel() * x.element_size())
        return x

    with ledger.record() as led, torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
        out = sptutor.rsa_attention(*leaves, causal=True, layout="zigzag")
        out.backward(dout_shard)
    messages = [e.key() for e in led.messages()]  # (op, rank, peer, nbytes, phase, step)
    return dict(out=out.detach(), saved=sum(saved), messages=messages)


rank0 = POOL.run(rsa_on_rank, args=(q, k, v, dout))[0]
print(f"rank 0: out {tuple(rank0['out'].shape)}, {rank0['saved']:,} bytes saved for backward, "
      f"{len(rank0['messages'])} messages:")  # fmt: skip
for message in rank0["messages"]:
    print("  ", message)

# %% [markdown]
# Comparing each rank's shards, messages and saved bytes with the oracle's is one call,
# `sptutor.testing.check_sptutor`, and it does so over many cases at once. It draws a sweep with
# hypothesis (W = 1 to 4, on the first W processes of the pool; both layouts; causal or not; GQA;
# odd head dims; float64 and float32), runs sptutor's own `rsa_attention` forward and backward on
# every rank of each case, and compares out, the LSE, dq, dk and dv with `oracle.simulate` at the
# tolerance of the case's dtype. That numerical verdict is all that
# [chapter 8, *Checking your own code*](08_checking_your_code.py) asks of your code, through the
# same machinery (`sptutor.testing.check`). Here the code is sptutor's own, so
# `enforce=("messages", "saved")` also fails a case unless every rank logged exactly the oracle's
# messages (op, rank, peer, bytes, phase and step, in order) and kept exactly the oracle's bytes for
# backward.

# %%
EXAMPLES = 8
# check_real: check_sptutor(method, world=4, dtypes=("float64", "float32"), enforce=("messages",
# "saved"), pool=...), its report printed, passed and messages_exact asserted
report = check_real("rsa", POOL, examples=EXAMPLES, layouts=("contiguous", "zigzag"),
                    causal=(False, True))  # fmt: skip
POOL.close()
multi_rank = report.on_several_ranks
print(f"{len(multi_rank)} of the {EXAMPLES} cases ran on 2 to 4 ranks: every rank's messages "
      "and saved bytes equal the oracle's")  # fmt: skip

# %% [markdown]
# <div class="admonition note">
# <p class="admonition-title">What the paper claims, what we measured</p>
# <p><b>The paper</b> (§3.2): RSA sends $2(N-1)\cdot BZ\frac{L}{N}A$ elements per device in forward
# and $6(N-1)\cdot BZ\frac{L}{N}A$ in backward, $8(N-1)\cdot BZ\frac{L}{N}A$ in all, the same
# total as Megatron's tensor parallelism. Its memory model (Tables 1–2) favours sequence
# parallelism when $BL > 16AZ$ (attention) and $BL > 32H$ (MLP). On Piz Daint P100s (§4) it
# reports, for BERT Base, 13.7× the maximum batch size of Megatron (SP on 64 GPUs against TP on
# 12, capped by the 12 heads), and about 3.0× the maximum sequence length at 64 GPUs (1.4× at
# the same 16 GPUs); with Linformer-style attention, 114K tokens on 32 GPUs.</p>
# <p><b>We measured</b> (cells above): the ledger equals $8(W-1)\cdot B\frac{S}{W}HD$ elements
# exactly, on every rank, for float32 and float64 multi-head attention, split 1 : 3 between forward
# and backward as the paper splits it; 16-bit inputs and GQA differ from the formula, as
# <code>sptutor.cost.rsa</code> predicts. The bytes RSA keeps for backward equal the paper's
# $3BZLA/N + BZL^2/N$ exactly, and with the paper's other terms the $BL > 16AZ$ rule holds on
# every row of the table. The real code on 4 processes equals the oracle, message for message and
# byte for byte. We do not reproduce the GPU-scale results: everything here is tiny and runs on
# a CPU.</p></div>
#
# API: [sptutor.rsa](../api/rsa.md) (the real code), [sptutor.oracle.rsa](../api/oracle-rsa.md)
# (the emulation), [sptutor.rows](../api/rows.md) (the full-row maths) and
# [sptutor.cost](../api/cost.md) (the closed forms). Next: [ring attention](02_ring_attention.py),
# which replaces the full row by an online softmax and keeps only $O(S/W)$.

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercise `rsa` blanks RSA's ring of keys, its ring of values and their
# backward, and the grader compares every shard and message with the oracle and explains the first
# mistake in one sentence ([Exercises](../exercises.md)).
# The emulated twin (`oracle_...`) needs no processes; the real one runs on 4:
#
# ```bash
#     sptutor exercise oracle_rsa && sptutor grade oracle_rsa.py
#     sptutor exercise rsa && sptutor grade rsa.py
# ```
