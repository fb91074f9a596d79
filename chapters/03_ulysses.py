# %% [markdown]
# # 3. DeepSpeed-Ulysses
#
# **DeepSpeed-Ulysses** (Jacobs, Tanaka, Zhang, Zhang, Song, Rajbhandari and He 2023,
# *DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence
# Transformer Models*, arXiv 2309.14509) does not pass blocks round a ring. Each rank starts with
# its S/W tokens of every head. One **all-to-all** regroups the ranks' data so that each rank
# holds *all* S tokens of a few heads. Attention is then an ordinary single-device attention
# over those heads, because heads never talk to each other. A second all-to-all puts each
# rank's tokens back. Its authors write N for the sequence length, h for the hidden size and P
# for the number of devices. Here that is $N = S$, $h = H_q D$ and $P = W$, and the number of
# ranks that split the heads is the Ulysses degree $U$ (all of them here: $U = W$).
#
# Shapes: a rank holds `(B, S/W, Hq, D)` before the first all-to-all and `(B, S, Hq/U, D)` after.

# %% tags=["hide-input"]

import matplotlib.pyplot as plt

import sptutor
import sptutor.ulysses
from sptutor import checks, cost, launch, layout, oracle, plots
from sptutor.notebook import check_real, show
from sptutor.oracle import reference
from sptutor.oracle import ulysses as oracle_ulysses
from sptutor.testing import random_inputs, relative_error

# %% [markdown]
# ## The all-to-all: from sequence to heads and back
#
# Cut the heads of rank i's tensor into U groups of $H/U$:
# $x_i = [x_i^{(0)}, \dots, x_i^{(U-1)}]$, each piece `(B, S/W, H/U, D)`. The all-to-all sends
# piece j to rank j. Rank j concatenates what it receives along the sequence, in rank order:
#
# $$\text{rank } j \text{ holds } \left[x_0^{(j)}; x_1^{(j)}; \dots; x_{U-1}^{(j)}\right]
# \quad (B, S, H/U, D).$$
#
# That is every token of head group j. A rank keeps one of its U pieces and sends the other
# U−1, so an all-to-all of a T-byte tensor puts $T(U-1)/U$ bytes on the wire per rank. The way
# back (heads → sequence) is the same exchange with the roles swapped: rank j sends rank i the
# i-th S/W slice of its tokens.

# %% tags=["hide-input"]
show(oracle_ulysses._seq_to_heads)

# %% tags=["hide-input"]
show(sptutor.ulysses._seq_to_heads)

# %% [markdown]
# The forward pass is three all-to-alls in (q, k, v), one full-sequence attention on this rank's
# heads (masks from the gathered global positions, so any layout works), and one all-to-all out.
# The oracle does each rank in a loop and logs the compute; the real code is one rank:

# %% tags=["hide-input"]
show(oracle_ulysses._forward)

# %% tags=["hide-input"]
show(sptutor.ulysses._forward)

# %% [markdown]
# The backward mirrors it: an all-to-all of dout (sequence → heads), the local FlashAttention-2
# backward with the out and LSE this rank already holds, and all-to-alls of dq, dk, dv back. That
# makes four all-to-alls in each phase.
#
# ## An emulated run
#
# Four emulated ranks, causal, four heads (one per rank), float64, checked against full
# attention and autograd:

# %%
B, S, Hq, Hkv, D, W = 1, 16, 4, 4, 8, 4
q, k, v, dout = random_inputs(B, S, Hq, Hkv, D)
sim = oracle.simulate("ulysses", q, k, v, dout, world=W, causal=True)

q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q, k, v))
out_ref, lse_ref = reference.full_attention(q_ref, k_ref, v_ref, causal=True)
out_ref.backward(dout)
pairs = [(sim.out, out_ref), (sim.lse, lse_ref), (sim.dq, q_ref.grad), (sim.dk, k_ref.grad),
         (sim.dv, v_ref.grad)]  # fmt: skip
worst = max(relative_error(a, b) for a, b in pairs)
assert worst < 1e-12  # float64: the same sums in another order
print(f"out, lse, dq, dk, dv vs full attention: worst relative error {worst:.1e}\n")

shard_bytes = B * (S // W) * Hq * D * q.element_size()  # one rank's (B, S/W, Hq, D) tensor
for rank in range(W):
    messages = sim.ledger.messages(rank)
    assert [e.op for e in messages] == ["all_to_all"] * 8  # 4 forward, 4 backward
    assert all(e.nbytes == shard_bytes * (W - 1) // W for e in messages)
macs = [sim.ledger.macs(rank) for rank in range(W)]
assert len(set(macs)) == 1  # causal, yet balanced: every rank attends its heads over all S
print(sim.ledger.summary())

# %% [markdown]
# Each rank runs the whole causal triangle for its own heads, so Ulysses has no load-balance
# problem, whatever the layout. The picture shows who holds which (head, token) before and after
# the first all-to-all:

# %%
plots.heads_and_tokens(sim)
plt.show()

# %% [markdown]
# And the schedule: each all-to-all is one band across the four ranks, labelled with the bytes
# each rank sends. The compute between them is one box per rank:

# %%
plots.schedule(sim)
plt.show()

# %% [markdown]
# ## The head-count constraint
#
# The heads are what Ulysses splits, so the query heads must divide evenly over the U ranks:
# $H_q \bmod U = 0$. The K/V heads either split too ($H_{kv} \bmod U = 0$), or there are fewer
# of them than ranks and each is copied to the ranks whose query heads use it
# ($U \bmod H_{kv} = 0$, for example MQA with $H_{kv} = 1$). Anything else has no clean split,
# and the call fails before any message with a sentence that says why:

# %% tags=["hide-input"]
show(checks.check_ulysses_heads)

# %%
for heads_q, heads_kv in ((6, 6), (12, 3)):
    q_bad, k_bad, v_bad, _ = random_inputs(1, 16, heads_q, heads_kv, 4)
    try:
        oracle.simulate("ulysses", q_bad, k_bad, v_bad, world=4)
    except ValueError as error:
        message = str(error)
        print(message)
    assert message.endswith(f"got Hq={heads_q}, Hkv={heads_kv}, U=4")

# %% [markdown]
# The real code runs the same check on every rank before its first all-to-all. So the Ulysses
# degree is at most $H_{kv}$ unless K/V heads are copied, and at most $H_q$ in any case. USP
# (Fang and Zhao 2024) spends the rest of the world on a ring (chapter 4).
#
# ## K/V replication when Hkv < U
#
# Under GQA, query head h uses K/V head $\lfloor h / (H_q/H_{kv}) \rfloor$. After the all-to-all,
# rank j holds query heads $jH_q/U, \dots, (j+1)H_q/U - 1$, which all use K/V head
# $\lfloor j / (U/H_{kv}) \rfloor$. So when $H_{kv} < U$, each rank repeats every K/V head
# $U/H_{kv}$ times before the all-to-all (`repeat_interleave`), and replica j lands on rank j.
# In backward, the gradients of the replicas are summed (`sptutor.heads.sum_replicas`).

# %% tags=["hide-input"]
show(oracle_ulysses._qkv_to_heads)

# %% tags=["hide-input"]
show(sptutor.ulysses._qkv_to_heads)

# %% [markdown]
# The copies are not free. K and V go on the wire with $\max(H_{kv}, U)$ heads, however few
# $H_{kv}$ is: K/V bytes on the wire stop falling once $H_{kv} < U$. Take U = 4 and 8 query
# heads, and count the bytes of the K all-to-all (the second forward message of each rank)
# against the K shard each rank holds. The ring sends K/V in proportion to $H_{kv}$, so its
# forward bytes for the same shapes are printed alongside:

# %%
print(" Hkv  replicas  K shard  K on the wire  wire/((U-1)/U·shard)  ulysses fwd  ring fwd")
for heads_kv in (8, 4, 2, 1):
    q_g, k_g, v_g, dout_g = random_inputs(1, 16, 8, heads_kv, 4, seed=heads_kv)
    s = oracle.simulate("ulysses", q_g, k_g, v_g, dout_g, world=4, causal=True)
    k_shard = k_g.shape[0] * (16 // 4) * heads_kv * 4 * k_g.element_size()  # (B, S/W, Hkv, D)
    k_wire = s.ledger.messages(0)[1].nbytes  # q, k, v, out: the second forward all-to-all
    replicas = max(1, 4 // heads_kv)
    assert k_wire == k_shard * replicas * 3 // 4  # (U-1)/U of the replicated shard
    shape = cost.Shape.of(q_g, k_g)
    ulysses_fwd, ring_fwd = cost.ulysses(shape, 4).forward[0], cost.ring(shape, 4).forward[0]
    assert s.ledger.bytes_sent(0, "forward") == ulysses_fwd
    assert (ring_fwd < ulysses_fwd) == (heads_kv < 4)  # fewer K/V heads than ranks: ring sends less
    print(f"{heads_kv:>4}  {replicas:>8}  {k_shard:>7}  {k_wire:>13}  "
          f"{k_wire / (k_shard * 3 / 4):>20.0f}  {ulysses_fwd:>11}  {ring_fwd:>8}")  # fmt: skip

# %% [markdown]
# Replication keeps the result exact. Here is MQA (one K/V head for all four ranks) against full
# attention, gradients included:

# %%
q_m, k_m, v_m, dout_m = random_inputs(1, 16, 4, 1, 8, seed=5)
mqa = oracle.simulate("ulysses", q_m, k_m, v_m, dout_m, world=4, causal=True, layout="zigzag")
q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q_m, k_m, v_m))
out_ref, _ = reference.full_attention(q_ref, k_ref, v_ref, causal=True)
out_ref.backward(dout_m)
mqa_error = max(
    relative_error(a, b)
    for a, b in ((mqa.out, out_ref), (mqa.dq, q_ref.grad), (mqa.dk, k_ref.grad),
                 (mqa.dv, v_ref.grad))
)  # fmt: skip
assert mqa_error < 1e-12
print(f"MQA, U=4, zigzag, causal: worst relative error vs full attention {mqa_error:.1e}")

# %% [markdown]
# The last two rows turn the comparison round: with fewer K/V heads than ranks the ring's
# forward sends fewer bytes than Ulysses', because the ring's traffic follows $H_{kv}$ down
# while Ulysses' copies stop at U heads.
#
# ## Bytes per rank: 1/W for Ulysses, about constant for the ring
#
# Per phase, a rank all-to-alls four tensors of its S/W tokens (q, k, v, out forward; dout, dq,
# dk, dv backward) and sends $(W-1)/W$ of each. With $H_{kv} = H_q = H$ that is
#
# $$\text{ulysses: } 8 \cdot \frac{W-1}{W} \cdot \frac{B S H D}{W}$$
#
# elements per rank, forward and backward together. The ring's K/V blocks make W−1 hops in each
# phase and its dK, dV make W, each hop $BSHD/W$ elements:
#
# $$\text{ring: } \big(2(W-1) + 2(W-1) + 2W\big) \frac{B S H D}{W} = (6W - 4)\,
# \frac{B S H D}{W} .$$
#
# So a ring rank sends about $6\,BSHD$ whatever W is, while a Ulysses rank's bytes
# fall as $1/W$. Here are both, measured from the oracle's ledgers at S = 64 over W = 2, 4, 8,
# each checked against `sptutor.cost`:

# %%
S64, H8, D4 = 64, 8, 4
q8, k8, v8, dout8 = random_inputs(1, S64, H8, H8, D4, seed=7)
unit = 1 * S64 * H8 * D4 * q8.element_size()  # bytes of one full (B, S, H, D) tensor
rows = []
print("method  W   sent/rank   saved/rank   sent / (B·S·H·D·bytes)")
for method in ("ulysses", "ring"):
    for world in (2, 4, 8):
        s = oracle.simulate(method, q8, k8, v8, dout8, world=world)
        expected = cost.of(method, cost.Shape.of(q8, k8), world)
        for rank in range(world):
            sent = s.ledger.bytes_sent(rank)
            assert sent == expected.forward[rank] + expected.backward[rank]
            assert s.ranks[rank].saved_bytes == expected.saved[rank]
        row = {"method": method, "world": world, "seq_len": S64,
               "sent": max(s.ledger.bytes_sent(r) for r in range(world)),
               "saved": max(r.saved_bytes for r in s.ranks)}  # fmt: skip
        rows.append(row)
        print(f"{method:>7} {world}  {row['sent']:>9,}  {row['saved']:>10,}   "
              f"{row['sent'] / unit:.3f}")  # fmt: skip

sent = {(r["method"], r["world"]): r["sent"] for r in rows}
for world in (2, 4, 8):
    assert sent["ulysses", world] * world**2 == 8 * (world - 1) * unit  # 8(W-1)/W² · BSHD
    assert sent["ring", world] * world == (6 * world - 4) * unit  # (6W-4)/W · BSHD
    assert sent["ulysses", world] < sent["ring", world]
saved_times_world = {(r["method"], r["saved"] * r["world"]) for r in rows}
assert len(saved_times_world) == 2  # each method's saved bytes per rank · W is constant: O(S/W)
saved = {(r["method"], r["world"]): r["saved"] for r in rows}
assert all(saved["ulysses", w] == saved["ring", w] for w in (2, 4, 8))  # Hkv = Hq: the same
print("\nledger == sptutor.cost for every rank; both methods keep O(S/W) bytes per rank")

fig, (ax_sent, ax_saved) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
plots.cost_curves(rows, x="world", y="sent", ax=ax_sent)
plots.cost_curves(rows, x="world", y="saved", ax=ax_saved)
plt.show()

# %% [markdown]
# Both keep O(S/W) bytes per rank for backward (the right panel). With $H_{kv} = H_q$ the two
# lines lie on top of each other: Ulysses keeps its heads-layout q, k, v, out, `(B, S, H/W, D)`,
# exactly as many bytes as the ring's `(B, S/W, H, D)` shards. What differs is the wire.
# The ring's traffic is independent of W because every block must visit every rank. Ulysses'
# traffic shrinks because a rank only ever sends its own S/W tokens, once per tensor.
#
# ## Real Ulysses on 4 processes
#
# `sptutor.testing.check_sptutor` runs sptutor's own `ulysses_attention` on 4 gloo processes (one
# `sptutor.launch.Pool`, started once) over a sweep of cases that hypothesis draws: W = 1 to 4, on
# the first W processes; the three layouts; causal or not; float64 and float32; head dims odd and
# even; and head counts that U = W can split (Hq a multiple of U, Hkv a multiple or a divisor of U,
# so MQA and GQA with replicated K/V heads come up). Each rank's out, dq, dk and dv are compared
# with `oracle.simulate` at the tolerance of the case's dtype. The LSE column stays empty: Ulysses
# returns its LSE only at the price of one more all-to-all, so the check calls it without. That
# numerical verdict is all that [chapter 8, *Checking your own code*](08_checking_your_code.py) asks
# of your code, through the same machinery (`sptutor.testing.check`). Here the code is sptutor's
# own, so `enforce=("messages", "saved")` also fails a case unless every rank logged exactly the
# oracle's messages (op, rank, peer, bytes, phase and step, in order) and kept exactly the oracle's
# bytes for backward.

# %%
POOL = launch.Pool(4, timeout=60)  # 4 gloo processes, started once
EXAMPLES = 8
# check_real: check_sptutor(method, world=4, dtypes=("float64", "float32"), enforce=("messages",
# "saved"), pool=...), its report printed, passed and messages_exact asserted
report = check_real("ulysses", POOL, examples=EXAMPLES, layouts=layout.LAYOUTS,
                    causal=(False, True))  # fmt: skip
POOL.close()
multi_rank = report.on_several_ranks
replicated = [r.case for r in multi_rank if r.case.heads_kv < r.case.world]  # Hkv < U
assert replicated
print(f"{len(multi_rank)} of the {EXAMPLES} cases ran on 2 to 4 ranks, {len(replicated)} of them "
      "with K/V heads replicated (Hkv < U): every rank's messages and saved bytes equal the "
      "oracle's")  # fmt: skip

# %% [markdown]
# ## What the paper claims, what we measured
#
# <div class="admonition note"><p class="admonition-title">What the paper claims, what we
# measured</p>
# <p><b>DeepSpeed-Ulysses</b> (Jacobs et al. 2023, abstract): "DeepSpeed-Ulysses maintains
# constant communication volume when sequence length and compute devices are increased
# proportionally". The authors' DeepSpeed-Ulysses blog post (section <i>Significant
# Communication Volume Reduction</i>) spells the analysis out: one all-to-all of the QKV
# projections (aggregate message 3Nh) and one of the output (Nh) per layer give "an aggregate
# communication volume per link of 4Nh/P", against 4Nh for Megatron-LM's sequence parallelism.
# Our forward bytes per rank are that $4Nh/P$ times $(W-1)/W$, the share of a rank's tensor
# that really leaves it. With S and W grown together they tend to a constant (printed
# below).</p>
# <p><b>USP</b> (Fang and Zhao 2024, Table 2, later version; N there is the parallel degree, our
# W, and $bs \cdot L \cdot d$ is our $B S H_q D$) counts SP-Ulysses as
# $(8/N)\cdot O(bs \cdot L \cdot d)$ per device per layer and SP-Ring as
# $4\,O(bs \cdot L \cdot d)$, rounding $(N-1)/N$ to 1. Ours, in units of $B S H D$ elements,
# is $8(W-1)/W^2$ for Ulysses and $(6W-4)/W$ for the ring (the table above). We read the
# table's 4 as K and V in forward and dK and dV in backward. Our ring's count tends to 6
# because sptutor also sends K and V round the ring again in backward instead of keeping every
# block. USP also notes (§3) that "if MQA is used and KV head number is 1, DS-Ulysses will not
# function". sptutor runs it by replicating the K/V head, at the price measured above (K/V
# traffic of U heads, not 1).</p>
# </div>

# %%
print(" W   S   forward bytes/rank   4Nh/P·(W-1)/W (bytes)")
forward_bytes = []
for world in (2, 4, 8):
    seq = 16 * world  # S grows with W
    q_p, k_p, v_p, _ = random_inputs(1, seq, H8, H8, D4, seed=world)
    s = oracle.simulate("ulysses", q_p, k_p, v_p, world=world)
    fwd = s.ledger.bytes_sent(0, "forward")
    paper = 4 * seq * H8 * D4 * q_p.element_size() // world  # 4Nh/P, N = S, h = Hq·D, in bytes
    assert fwd == paper * (world - 1) // world
    forward_bytes.append(fwd)
    print(f"{world:>2} {seq:>3}   {fwd:>18,}   {paper * (world - 1) // world:>21,}")
assert forward_bytes == sorted(forward_bytes) and forward_bytes[-1] < 4 * 16 * H8 * D4 * 8
print(f"bounded by 4·16·h·bytes = {4 * 16 * H8 * D4 * 8:,}: constant in the limit, as claimed")

# %% [markdown]
# The API: [sptutor.ulysses](../api/ulysses.md) (the real code),
# [sptutor.oracle.ulysses](../api/oracle-ulysses.md) (the emulation) and
# [sptutor.heads](../api/heads.md) (the replication of K/V heads).

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercise `ulysses` blanks the two all-to-alls' index arithmetic and the
# backward, and the grader compares every shard and message with the oracle and explains the first
# mistake in one sentence ([Exercises](../exercises.md)).
# The emulated twin (`oracle_...`) needs no processes; the real one runs on 4:
#
# ```bash
#     sptutor exercise oracle_ulysses && sptutor grade oracle_ulysses.py
#     sptutor exercise ulysses && sptutor grade ulysses.py
# ```
