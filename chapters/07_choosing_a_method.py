# %% [markdown]
# # 7. Choosing a method
#
# Seven methods, one question: which should a given model on a given number of ranks use? This
# chapter puts every method's costs in one table: bytes each rank sends, how many sequential
# rounds of communication a call needs, and bytes each rank keeps for backward. The numbers come
# from two independent sources that must agree: the oracle's ledger, which counts what each
# emulated rank actually sends, and the closed forms in `sptutor.cost`. Then it shows where each
# method wins (heads, causal balance, GQA, linear attention) and plots the costs over W at a
# realistic size.
#
# Five methods compute the same exact softmax attention: `rsa`, `ring`, `ulysses`, `usp`, `lss`.
# The other two, `lasp` and `lasp2`, compute **linear** attention, a different model. They are in
# the table because their costs are the contrast, but they are not a drop-in replacement.

# %% tags=["hide-input"]
import itertools

import matplotlib.pyplot as plt
import torch

from sptutor import cost, oracle, plots
from sptutor.checks import check_ulysses_heads
from sptutor.methods import METHODS
from sptutor.notebook import show
from sptutor.testing import random_inputs


def most_sent(c: cost.Cost) -> int:
    """Bytes sent per rank, forward + backward, by the rank that sends most."""
    return max(f + b for f, b in zip(c.forward, c.backward))


def format_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# %% [markdown]
# ## Counting rounds
#
# Bytes measure bandwidth. **Rounds** measure latency: how many times, one after another, a rank
# must wait for messages. A ring of W ranks needs W − 1 of them for a block to get around, and one
# collective needs one. We count rounds from the ledger as follows. Each rank's messages are cut
# into **rounds**: a round is a maximal run of messages with the same (op, step), not
# interrupted by compute. Each round gets the label (phase, step, how many earlier rounds of this
# rank in this phase had the same step). Rounds with the same label on different ranks happen at
# the same time, so a call's round count is the number of distinct labels over all ranks.
#
# Ulysses' three all-to-alls of q, k, v are then one round, and its all-to-all of out, after the
# local attention, is a second. In LASP's chain rank t sends at step t, so its W − 1 rounds stay
# distinct even though each rank sends only once. The count ignores overlap: the ring's backward
# counts two rounds per step (K, V going on, then dK, dV after the compute), though a good
# implementation hides the first behind compute. Read the count as an upper bound on waits.


# %%
def rounds(ledger) -> int:
    """Sequential communication rounds of one call (the definition above)."""
    labels = set()
    for rank, phase in itertools.product({e.rank for e in ledger.events}, ("forward", "backward")):
        previous, seen = None, {}  # the last message's (op, step); rounds so far per step
        for event in (e for e in ledger.events if e.rank == rank and e.phase == phase):
            if not event.is_message:
                previous = None  # compute ends a round
                continue
            if (event.op, event.step) != previous:
                occurrence = seen.get(event.step, 0)
                seen[event.step] = occurrence + 1
                labels.add((phase, event.step, occurrence))
            previous = (event.op, event.step)
    return len(labels)


# %% [markdown]
# Applied to every method at W = 2, 4, 8, the count has a closed form for each (R = W/U for
# USP, whose ring part adds nothing when R = 1):

# %%
ROUNDS = {
    "rsa": lambda W, R: 4 * W - 2,  # K ring, V ring forward; V, K rings + 2 all-reduces backward
    "ring": lambda W, R: 3 * W - 2,  # W-1 forward; W-1 K/V shifts + W dK/dV hops backward
    "ulysses": lambda W, R: 4,  # q,k,v | out forward; dout | dq,dk,dv backward
    "usp": lambda W, R: 4 + (3 * R - 2 if R > 1 else 0),  # Ulysses' 4 around a ring of R
    "lss": lambda W, R: 2,  # one all-gather, one reduce-scatter
    "lasp": lambda W, R: 2 * (W - 1),  # the state's chain, causal
    "lasp2": lambda W, R: 2,  # one all-gather per phase
}
print(f"{'W':>2} " + " ".join(f"{m:>7}" for m in METHODS))
for W in (2, 4, 8):
    q, k, v, dout = random_inputs(1, 32, 8, 2, 4, dtype=torch.float32)
    counted = {}
    for method in METHODS:
        U = 2 if method == "usp" else None
        sim = oracle.simulate(method, q, k, v, dout, world=W, causal=True, ulysses=U)
        counted[method] = rounds(sim.ledger)
        assert counted[method] == ROUNDS[method](W, W // (U or 1)), (method, W)
    print(f"{W:>2} " + " ".join(f"{counted[m]:>7}" for m in METHODS))
lasp_non_causal = oracle.simulate("lasp", q, k, v, dout, world=8, causal=False)
assert rounds(lasp_non_causal.ledger) == 2  # non-causal LASP: one all-reduce per phase
print("non-causal lasp at W=8:", rounds(lasp_non_causal.ledger), "rounds (all-reduces)")

# %% [markdown]
# ## One table, every method
#
# Each method at one small size (B = 1, S = 32, Hq = 8, Hkv = 2, D = 8, W = 4, float32, causal;
# USP with U = 2, R = 2), emulated. For every rank, the ledger's bytes sent in forward and in
# backward and the bytes kept for backward must equal `sptutor.cost`. The table shows the maximum
# over ranks, because the slowest rank sets the pace.

# %%
B, S, Hq, Hkv, D, W, U = 1, 32, 8, 2, 8, 4, 2
q, k, v, dout = random_inputs(B, S, Hq, Hkv, D, dtype=torch.float32)
shape = cost.Shape.of(q, k)
print(f"B={B}, S={S}, Hq={Hq}, Hkv={Hkv}, D={D}, W={W}, float32, causal")
print(f"{'method':<8} {'sent/rank':>11} {'rounds':>7} {'saved/rank':>11}   ledger == cost")
for method in METHODS:
    degree = U if method == "usp" else None
    sim = oracle.simulate(method, q, k, v, dout, world=W, causal=True, ulysses=degree)
    closed_form = cost.of(method, shape, W, causal=True, ulysses=degree)
    for rank in range(W):
        forward, backward = (sim.ledger.bytes_sent(rank, p) for p in ("forward", "backward"))
        assert (forward, backward) == (closed_form.forward[rank], closed_form.backward[rank])
        assert sim.ranks[rank].saved_bytes == closed_form.saved[rank]
    sent = max(sim.ledger.bytes_sent(rank) for rank in range(W))
    saved = max(record.saved_bytes for record in sim.ranks)
    print(f"{method:<8} {sent:>11,} {rounds(sim.ledger):>7} {saved:>11,}   yes")

# %% [markdown]
# The closed forms are short. Here is the one for USP, which is Ulysses' all-to-alls around ring
# attention on a sub-shape:

# %% tags=["hide-input"]
show(cost.usp)

# %% [markdown]
# ## The same table at a realistic size
#
# Now the closed forms, which the ledger has just matched, at a Llama3-8B-like attention layer:
# B = 1, S = 32768, Hq = 32, Hkv = 8, D = 128, bf16, causal, on W = 16 ranks. USP takes U = 8 =
# Hkv and R = 2. Ulysses on 16 ranks must replicate each of the 8 K/V heads twice. The rounds are
# counted on an emulated call at the same W (they depend only on W and U), with tiny tensors.

# %%
real = cost.Shape(1, 32768, 32, 8, 128, torch.bfloat16)
W, U = 16, 8
q, k, v, dout = random_inputs(
    1, 32, 16, 8, 4, dtype=torch.float32
)  # tiny: rounds depend only on W and U
print(f"B=1, S=32768, Hq=32, Hkv=8, D=128, bf16, causal, W={W} (usp: U={U}, R={W // U})")
print(f"{'method':<8} {'sent/rank':>11} {'rounds':>7} {'saved/rank':>11}")
big = {}
for method in METHODS:
    degree = U if method == "usp" else None
    c = cost.of(method, real, W, causal=True, ulysses=degree)
    sim = oracle.simulate(method, q, k, v, world=W, causal=True, ulysses=degree, dout=dout)
    big[method] = (most_sent(c), rounds(sim.ledger), max(c.saved))
    sent, count, saved = big[method]
    print(f"{method:<8} {format_bytes(sent):>11} {count:>7} {format_bytes(saved):>11}")
# the orderings the guide below relies on
assert big["ulysses"][0] < big["usp"][0] < big["lss"][0] < big["ring"][0] < big["rsa"][0]
assert big["rsa"][2] > 10 * max(big[m][2] for m in METHODS if m != "rsa")  # O(S²/W)
assert big["lss"][2] > 2 * big["ring"][2]  # O(S): the gathered K and V
assert big["lasp"][0] < big["lasp2"][0] < big["ulysses"][0]

# %% [markdown]
# ## Where each wins
#
# ### Heads against ranks
#
# Ulysses turns the sequence into heads, so each of U ranks needs its own share of the query
# heads, and the K/V heads must split evenly or replicate evenly:
# $Hq \bmod U = 0$ and ($Hkv \bmod U = 0$ or $U \bmod Hkv = 0$). With 32 query heads it stops at
# 32 ranks. USP and the ring have no such limit.

# %%
check_ulysses_heads(32, 8, 32)  # 32 ranks: allowed (K/V replicated 4x)
try:
    check_ulysses_heads(32, 8, 64)
    raise AssertionError("Ulysses should refuse 64 ranks for 32 heads")
except ValueError as error:
    print(f"Ulysses on 64 ranks: ValueError:\n  {error}")
c = cost.of("usp", real, 64, ulysses=8)
print(f"USP on 64 ranks (U=8, R=8): {format_bytes(c.forward[0] + c.backward[0])} sent per rank")

# %% [markdown]
# ### Causal balance
#
# Under a causal mask, a contiguous split leaves the last rank most of the work and the first
# almost none. The ring's layouts fix this by giving each rank early and late tokens. Zigzag
# (chunks r and 2W − 1 − r) balances exactly, and striped (every W-th token) nearly so. The
# work is counted as useful multiply-adds per rank, from the oracle's compute events, for the ring
# on 4 ranks:

# %%
q, k, v, dout = random_inputs(1, 64, 2, 2, 8, dtype=torch.float32)
rows, imbalance = [], {}
for lay in ("contiguous", "zigzag", "striped"):
    sim = oracle.simulate("ring", q, k, v, dout, world=4, causal=True, layout=lay)
    macs = [sim.ledger.macs(rank) for rank in range(4)]
    imbalance[lay] = max(macs) / min(macs)
    rows += [{"layout": lay, "rank": rank, "macs": m} for rank, m in enumerate(macs)]
print(", ".join(f"{lay} max/min {ratio:.3f}" for lay, ratio in imbalance.items()))
assert imbalance["zigzag"] == 1.0 < imbalance["striped"] < 1.1 < 6 < imbalance["contiguous"]
plots.balance(rows)
plt.show()

# %% [markdown]
# ### GQA: who profits from fewer K/V heads
#
# The ring sends only K and V (and their gradients), so its bytes scale with Hkv: 4 query heads
# per K/V head divide them by 4. Ulysses also moves q, out and their gradients, which keep all
# Hq heads, so GQA saves it less. Beyond Hkv ranks, Ulysses also has to replicate K/V heads, which
# costs bytes and saved memory. USP with U = Hkv avoids the replication. Bytes per rank at the
# realistic size, GQA (Hkv = 8) against MHA (Hkv = 32):

# %%
mha = cost.Shape(1, 32768, 32, 32, 128, torch.bfloat16)
print(f"{'W':>3} {'method':<8} {'GQA sent':>10} {'MHA sent':>10} {'GQA/MHA':>8} {'GQA saved':>10}")
ratio = {}
for W, method, degree in (
    (8, "ring", None),
    (8, "ulysses", None),
    (16, "ulysses", None),
    (16, "usp", 8),
):
    gqa_cost, mha_cost = (cost.of(method, s, W, ulysses=degree) for s in (real, mha))
    gqa_sent, mha_sent = most_sent(gqa_cost), most_sent(mha_cost)
    ratio[W, method] = gqa_sent / mha_sent
    gqa_saved = format_bytes(gqa_cost.saved[0])
    sent_text = f"{format_bytes(gqa_sent):>10} {format_bytes(mha_sent):>10}"
    print(f"{W:>3} {method:<8} {sent_text} {ratio[W, method]:>8.3f} {gqa_saved:>10}")
assert ratio[8, "ring"] == 8 / 32  # exactly Hkv/Hq
assert ratio[8, "ring"] < ratio[8, "ulysses"] < ratio[16, "ulysses"]  # replicas cost bytes
replicated, unreplicated = (
    cost.of(m, real, 16, ulysses=d).saved[0] for m, d in (("ulysses", None), ("usp", 8))
)
assert replicated > unreplicated  # and memory
print(
    f"saved at W=16: ulysses {format_bytes(replicated)} (K/V replicated 2x), "
    f"usp U=8 {format_bytes(unreplicated)}"
)

# %% [markdown]
# ### Linear attention: a message that does not grow with S
#
# LASP passes one state per rank, of shape $(B, Hq, D, D)$ in float32 here, whatever the
# sequence length. For the softmax methods, each message is a block of the sequence. LASP-2
# gathers every rank's state in one collective. That is more bytes than LASP's chain, but one
# round instead of W − 1. Bytes per rank at W = 16 over S:

# %%
print(f"{'S':>7} {'ring':>10} {'ulysses':>10} {'lasp':>10} {'lasp2':>10}")
linear = {}
for S in (8192, 32768, 131072):
    s = cost.Shape(1, S, 32, 8, 128, torch.bfloat16)
    methods = ("ring", "ulysses", "lasp", "lasp2")
    linear[S] = {m: most_sent(cost.of(m, s, 16, causal=True)) for m in methods}
    print(f"{S:>7} " + " ".join(f"{format_bytes(x):>10}" for x in linear[S].values()))
state = 1 * 32 * 128 * 128 * 4  # one (B, Hq, D, D) float32 state
assert all(linear[S]["lasp"] == 2 * state for S in linear)  # one state forward, one back
assert linear[131072]["ring"] == 16 * linear[8192]["ring"]  # softmax messages grow with S

# %% [markdown]
# ## Costs over W
#
# Bytes per rank against W = 2 … 64 at the realistic size (B = 1, S = 32768, Hq = 32, Hkv = 8,
# D = 128, bf16, causal), from `sptutor.cost`. Ulysses stops at W = 32 (the heads). USP uses
# U = min(W, Hkv), so up to 8 ranks it is Ulysses and its line lies on Ulysses'. On the right,
# the ring keeps what USP keeps (its line is hidden under USP's), and LASP what LASP-2 keeps.

# %%
cost_rows = []
for W in (2, 4, 8, 16, 32, 64):
    for method in METHODS:
        if method == "ulysses" and real.heads_q < W:  # Ulysses needs Hq >= W
            continue
        c = cost.of(method, real, W, causal=True, ulysses=min(W, real.heads_kv))
        sent = most_sent(c)
        cost_rows.append(
            dict(method=method, world=W, seq_len=real.seq_len, sent=sent, saved=max(c.saved))
        )
saved_at = {(r["method"], r["world"]): r["saved"] for r in cost_rows}
assert all(saved_at["ring", w] == saved_at["usp", w] for w in (2, 4, 8, 16, 32, 64))
assert all(saved_at["lasp", w] == saved_at["lasp2", w] for w in (2, 4, 8, 16, 32, 64))
figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
plots.cost_curves(cost_rows, x="world", y="sent", ax=left)
plots.cost_curves(cost_rows, x="world", y="saved", ax=right)
figure.tight_layout()
plt.show()

# %% [markdown]
# ## A decision guide
#
# Read with the tables above. All of it is about bytes, rounds and memory. Time also depends on
# the network and on how well communication overlaps compute, which this emulation does not
# model.
#
# 1. **Softmax attention with heads to spare (W divides Hq, and W divides Hkv or Hkv divides W):
#    Ulysses.**
#    It sends the fewest bytes of the exact methods, its traffic per rank falls as W grows, and it
#    needs only 4 rounds whatever W. Its all-to-alls want fast links between all U ranks.
# 2. **More ranks than heads, or a slow network between groups: USP.** Put Ulysses inside a node
#    (U ≤ Hkv, to avoid replicating K/V) and a ring across nodes. It costs more bytes and more
#    rounds than Ulysses, but fewer than the ring, and it runs on any W = U·R.
# 3. **Pure ring attention** when the heads cannot be split at all (U = 1). Its bytes per rank do
#    not shrink with W, but its messages are point-to-point and can overlap compute. Under a
#    causal mask, always use **zigzag** (exact balance) or striped (near balance). The ring
#    profits most from GQA, since it sends only K and V.
# 4. **LSS** sends fewer bytes than the ring (the ring's forward, then only dK, dV back) in one
#    all-gather and one reduce-scatter (2 rounds). But each rank keeps the whole sequence's K and
#    V, so its saved memory is O(S), not O(S/W).
# 5. **RSA** is the historical baseline: it keeps full score rows, O(S²/W) per rank,
#    more than ten times what the others keep, and it needs the most rounds.
# 6. **Linear attention** is a different model. If you use it, LASP's state message does not grow
#    with S at all. LASP-2 trades W − 1 sequential rounds for one all-gather that moves W − 1
#    states, the better choice when latency dominates.

# %% [markdown]
# <div class="admonition note"><p class="admonition-title">What the papers claim, what we
# measured</p>
# <p><b>Claim</b> (Li et al. 2021, <i>Sequence Parallelism: Long Sequence Training from System
# Perspective</i>, §3.2): RSA sends 2(N−1)·B·Z·(L/N)·A elements forward and 6(N−1)·B·Z·(L/N)·A
# backward (N ranks, Z heads, A head size, L length). <b>Measured</b> (cell below): exactly
# that, for float32 multi-head attention.</p>
# <p><b>Claim</b> (Fang &amp; Zhao 2024, arXiv 2405.07719 v5, Table 2): SP-Ulysses sends
# (8/N)·O(bs·L·d) per device. <b>Measured:</b> 8(W−1)/W² in units of B·S·Hq·D, the same with
# (N−1)/N rounded to 1.</p>
# <p><b>Claim</b> (Sun et al. 2025, LASP-2, arXiv 2502.07563, §3.4): LASP needs 2(W−1)
# sequential steps per iteration, LASP-2 two, each moving a B·H·d² state. <b>Measured:</b> the
# rounds above (2(W−1) and 2). On the wire, each LASP-2 all-gather puts W−1 states per rank,
# where the paper counts one state per step.</p>
# </div>

# %%
B, S, H, D, W = 1, 32, 4, 8, 4
q, k, v, dout = random_inputs(B, S, H, H, D, dtype=torch.float32)
unit = B * H * (S // W) * D * q.element_size()  # B·Z·(L/N)·A elements, in bytes
rsa = oracle.simulate("rsa", q, k, v, dout, world=W)
assert rsa.ledger.bytes_sent(0, "forward") == 2 * (W - 1) * unit
assert rsa.ledger.bytes_sent(0, "backward") == 6 * (W - 1) * unit
ulysses = oracle.simulate("ulysses", q, k, v, dout, world=W)
assert ulysses.ledger.bytes_sent(0) == 8 * (W - 1) * B * S * H * D * q.element_size() // W**2
forward, backward = (rsa.ledger.bytes_sent(0, p) // unit for p in ("forward", "backward"))
print(f"RSA per rank: forward {forward} = 2(W-1), backward {backward} = 6(W-1), in B·Z·(L/N)·A")
per_rank = ulysses.ledger.bytes_sent(0) / (B * S * H * D * q.element_size())
print(f"Ulysses per rank: {per_rank:.4f} = 8(W-1)/W² in B·S·Hq·D")

# %% [markdown]
# API: [sptutor.cost](../api/cost.md) (the closed forms), [sptutor.ledger](../api/ledger.md)
# (what a message costs), [sptutor.methods](../api/methods.md) (the names).
