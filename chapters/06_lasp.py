# %% [markdown]
# # 6. LASP and LASP-2: linear attention passes a state
#
# Every method so far moves keys and values, or pieces of the attention matrix, between ranks, so
# its messages grow with the sequence. **Linear attention** drops the softmax, and with it the need
# to see every key: all a query needs from the past fits in one $D\times D$ matrix per head, the
# **state**. LASP (Sun, Qin, Li, Shen, Qiao, Zhong, 2024, *Linear Attention Sequence
# Parallelism*) hands that state from rank to rank down a chain; LASP-2 (Sun et al. 2025, *LASP-2:
# Rethinking Sequence Parallelism for Linear Attention and Its Hybrid*) gathers every rank's state
# in one collective instead. Either way a message has the same size whatever the sequence
# length $S$.
#
# This chapter builds the method from the bottom: the right-product trick, the state and its
# decay, the chunk formula, then the chain (LASP) against the all-gather (LASP-2), with their
# ledgers, their bytes as $S$ grows, their sequential steps, and the real code on 4 processes.

# %% tags=["hide-input"]
import math

import matplotlib.pyplot as plt
import torch

import sptutor.lasp
import sptutor.lasp2
import sptutor.oracle.lasp
import sptutor.oracle.lasp2
from sptutor import chunks, cost, launch, oracle, plots
from sptutor.chain import Chain
from sptutor.notebook import check_real, show
from sptutor.testing import oracle_tolerance, relative_error

_ = torch.manual_seed(0)  # seeded: every number below is reproducible

# %% [markdown]
# ## The right-product trick
#
# sptutor's linear attention is **unnormalised** and causal with a per-head decay
# $\lambda \in (0, 1]$ (the papers' $\lambda$; sptutor's `decay`, a `(Hq,)` tensor):
#
# $$o_i = \sum_{j \le i} \lambda^{\,i-j}\, (q_i \cdot k_j)\, v_j .$$
#
# Computed as written, this is the *left product* $\big[(Q K^\top) \odot M\big] V$ with the
# $S\times S$ mask $M_{ij} = \lambda^{i-j}$ for $i \ge j$ and 0 otherwise: $O(S^2 D)$ work and an
# $S\times S$ matrix per head. That is what the ground truth `oracle.full_linear_attention` does.
# But $q_i \cdot k_j$ is a scalar, so the sum regroups (the *right product*):
#
# $$o_i = q_i \underbrace{\sum_{j \le i} \lambda^{\,i-j}\, k_j^\top v_j}_{KV_i}, \qquad
# KV_i = \lambda\, KV_{i-1} + k_i^\top v_i ,$$
#
# where $k_j^\top v_j$ is the $D\times D$ outer product. One pass over the tokens, carrying a
# $D\times D$ matrix, gives every output: $O(S D^2)$ work and no $S\times S$ anything.

# %%
B, S, Hq, Hkv, D = 1, 16, 2, 2, 4
q, k, v = (torch.randn(B, S, Hq, D, dtype=torch.float64) for _ in range(3))
decay = torch.tensor([0.9, 0.6], dtype=torch.float64)  # one rate per head

state = torch.zeros(B, Hq, D, D, dtype=torch.float64)  # KV_{-1} = 0
outputs = []
for i in range(S):  # the right product: one D×D state carried along the sequence
    state = decay[:, None, None] * state + torch.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
    outputs.append(torch.einsum("bhd,bhde->bhe", q[:, i], state))  # o_i = q_i KV_i
right_product = torch.stack(outputs, dim=1)  # (B, S, Hq, D)

left_product = oracle.full_linear_attention(q, k, v, causal=True, decay=decay)
right_error = relative_error(right_product, left_product)
assert right_error < 1e-12  # the same sums, regrouped: float64 rounding only
print(f"running D×D state vs the full S×S weights: relative error {right_error:.1e}")
print(f"per head: the left product holds {S * S} weights, the state {state[0, 0].numel()} numbers")

# %% [markdown]
# ## The state and its decay
#
# The state after position $p$ is
#
# $$KV_p = \sum_{j \le p} \lambda^{\,p-j}\, k_j^\top v_j \qquad \text{shape } (B, Hq, D, D),$$
#
# one $D\times D$ matrix per query head (under GQA sptutor broadcasts K/V heads to the query heads
# first, so a state is per query head). Token $j$'s share of $KV_p$ is weighted by
# $\lambda^{p-j}$: it fades geometrically as the sequence moves on, fast for a small rate, not at
# all for $\lambda = 1$ (plain causal linear attention). The recurrence above and this closed form
# are the same matrix:

# %%
p = S - 1
distance = p - torch.arange(p + 1, dtype=torch.float64)  # p - j for j = 0..p
weights = decay[:, None] ** distance  # (Hq, p+1): lambda^(p-j), token j's weight in KV_p
closed_form = torch.einsum("hj,bjhd,bjhe->bhde", weights, k[:, : p + 1], v[:, : p + 1])
state_error = relative_error(state, closed_form)
assert state_error < 1e-12
print(f"KV_{p} by the recurrence vs the closed form: relative error {state_error:.1e}")
for head in range(Hq):
    oldest, newest = weights[head, 0].item(), weights[head, -1].item()
    assert newest == 1.0 and math.isclose(oldest, decay[head].item() ** p, rel_tol=1e-12)
    print(
        f"head {head}, decay {decay[head]:.1f}: token 0 weighs {oldest:.2e} in KV_{p}, token {p} 1"
    )

# %% [markdown]
# ## A chunk: intra part, readout of the incoming state, outgoing state
#
# Cut the sequence into chunks of $C$ tokens. A chunk that starts after global position $p_0$ needs
# from the past only $KV_{p_0}$. For the token at offset $i$ in the chunk (global position
# $p_0 + 1 + i$), the keys inside the chunk give a small left product, and the keys up to $p_0$
# give a readout of the incoming state, $i + 1$ steps of decay away:
#
# $$o_i = \Big(\big[(Q K^\top) \odot M\big] V\Big)_i + \lambda^{\,i+1}\, q_i\, KV_{p_0},$$
#
# now with a $C\times C$ mask $M$. The state it hands on is the incoming one decayed over the
# chunk plus the chunk's own contribution (its **local state**):
#
# $$KV_{\text{out}} = KV_{p_0 + C} = \lambda^{C}\, KV_{p_0} + \sum_{i=0}^{C-1} \lambda^{\,C-1-i}\,
# k_i^\top v_i .$$
#
# In the LASP-2 paper's notation (Algorithm 2) the state after chunk $t$ is $M_t$, the mask is
# $\Psi$, the chunk count is $T$ and the head dimension $d$; here they are $KV$, $M$, $W$ (one
# chunk per rank) and $D$. sptutor writes the chunk once, in `sptutor/chunks.py`; the oracle and
# the real code's `"torch"` backend both call it:

# %% tags=["hide-input"]
show(chunks.forward)

# %% [markdown]
# Four chunks run one after another, each handed the state of the one before, give the whole
# sequence, and the last outgoing state is $KV_{S-1}$, the running state of the first cell:

# %%
W = 4
C = S // W
chunk_outputs, chunk_state = [], None  # None: no state before the first chunk
for t in range(W):
    part = slice(t * C, (t + 1) * C)
    chunk_out, chunk_state = chunks.forward(q[:, part], k[:, part], v[:, part], chunk_state, decay)
    chunk_outputs.append(chunk_out)
chunk_error = relative_error(torch.cat(chunk_outputs, dim=1), left_product)
last_state_error = relative_error(chunk_state, state)
assert chunk_error < 1e-12 and last_state_error < 1e-12
print(f"{W} chunks of C={C}, state handed on, vs full linear attention: error {chunk_error:.1e}")
print(f"last outgoing state vs KV_{S - 1} of the first cell: error {last_state_error:.1e}")

# %% [markdown]
# ## LASP: the state walks down a chain
#
# Put chunk $t$ on rank $t$ (the contiguous layout; the state runs in sequence order, so LASP
# accepts no other) and that loop *is* LASP. Every rank first does what needs nobody: its intra
# part and its local state. Then rank $t$ waits for $KV_{p_0}$ from rank $t-1$, passes
# $KV_{\text{out}} = \lambda^C KV_{p_0} + \text{local}$ on to rank $t+1$ **at once** (rank $t+1$
# waits for that, not for rank $t$'s output), and only then reads its own queries against the
# state. The state it received is kept for backward ("state caching" in the LASP code), never
# recomputed or sent again. The oracle's step loop, every rank in one process:

# %% tags=["hide-input"]
show(sptutor.oracle.lasp._forward)

# %% [markdown]
# and the real code, one process per rank, on `torch.distributed` through `sptutor.comm`. A chain
# step is a blocking `recv` from the previous rank, then a `send` to the next; there is no cycle,
# so no deadlock:

# %% tags=["hide-input"]
show(sptutor.lasp._forward)

# %% [markdown]
# The backward runs the chain in reverse. Rank $t$ receives $dKV_{\text{out}}$ (the gradient of
# the state it sent) from rank $t+1$, and sends rank $t-1$ the gradient of the state it read,
#
# $$dKV_{p_0} = \lambda^{C}\, dKV_{\text{out}} + \sum_i \lambda^{\,i+1}\, q_i^\top dO_i ,$$
#
# the same `chunks.carry` step with the local part built from $Q$ and $dO$.
#
# ## LASP-2: one all-gather, then a prefix sum on every rank
#
# The chain makes rank $W-1$ wait for $W-1$ messages in a row. But the state rank $t$ needs is a
# fixed combination of the **local** states of the ranks before it, which each rank computes
# without help:
#
# $$KV_{p_0}(t) = \sum_{t' < t} \lambda^{\,C\,(t-1-t')}\; \text{local}_{t'} .$$
#
# So LASP-2 all-gathers the local states (one collective; the paper overlaps it with the intra
# part) and every rank runs the chain's `carry` steps itself, on the gathered states
# (`chunks.decayed_sum`, Horner's rule). The backward all-gathers the local $dKV$s and sums the
# ranks *after* this one (a suffix). The oracle:

# %% tags=["hide-input"]
show(sptutor.oracle.lasp2._forward)

# %% [markdown]
# and the real code:

# %% tags=["hide-input"]
show(sptutor.lasp2._forward)

# %% [markdown]
# ## An emulated run and its ledger
#
# `oracle.simulate` runs both on 4 emulated ranks, forward and backward, and logs every message.
# Both give the ground truth's output, and the state each rank read (`state_in`, what it keeps for
# backward) is the same matrix whether it came down the chain or was summed from the gathered
# local states:

# %%
dout = torch.randn_like(q)
sims = {
    method: oracle.simulate(method, q, k, v, dout, world=W, causal=True, decay=decay)
    for method in ("lasp", "lasp2")
}
for method, sim in sims.items():
    sim_error = relative_error(sim.out, left_product)
    assert sim_error <= oracle_tolerance(torch.float64)
    print(f"{method}: output vs full linear attention, relative error {sim_error:.1e}")
assert sims["lasp"].ranks[0].state_in is None and sims["lasp2"].ranks[0].state_in is None
worst_state = max(
    relative_error(sims["lasp2"].ranks[t].state_in, sims["lasp"].ranks[t].state_in)
    for t in range(1, W)
)
assert worst_state < 1e-12
print(
    f"state read on ranks 1..{W - 1}, gathered-and-summed vs chained: worst error {worst_state:.1e}"
)

# %% [markdown]
# The chain's messages, sender by sender: rank $t$ sends rank $t+1$ one state in forward, and the
# gradient comes back the other way. Each message is one `(B, Hq, D, D)` state in float64:

# %%
state_bytes = B * Hq * D * D * torch.float64.itemsize
print(f"one state (B, Hq, D, D) = ({B}, {Hq}, {D}, {D}) in float64: {state_bytes} bytes")
for method, sim in sims.items():
    print(f"\n{method}")
    for event in sim.ledger.messages():
        peer = "" if event.peer is None else f" -> {event.peer}"
        print(f"  {event.phase:<8} step {event.step}  {event.op:<10} rank {event.rank}{peer}"
              f"  {event.nbytes} bytes")  # fmt: skip
lasp_messages = sims["lasp"].ledger.messages()
assert len(lasp_messages) == 2 * (W - 1) and all(e.nbytes == state_bytes for e in lasp_messages)
gather_messages = sims["lasp2"].ledger.messages()
assert len(gather_messages) == 2 * W  # one all-gather per phase, every rank in it
assert all(e.nbytes == (W - 1) * state_bytes for e in gather_messages)  # W-1 states on the wire

# %% [markdown]
# The same, drawn: LASP's state moving rank to rank (forward down, backward up) and LASP-2's one
# gathered band per phase.

# %%
plots.state_chain(sims["lasp"])
plt.show()

# %%
plots.state_chain(sims["lasp2"])
plt.show()

# %% [markdown]
# ## Bytes per rank do not grow with S
#
# A state is $B \cdot Hq \cdot D^2$ numbers whatever the chunk length, so doubling $S$ (at fixed
# $W$) doubles every rank's work but not one byte of its messages. Ring attention, for contrast,
# sends K/V blocks of $S/W$ tokens, so its bytes grow linearly in $S$. Here are the ledgers at
# $W = 4$ for $S$ = 32 to 256 (bytes each rank sends, forward plus backward, the largest over
# ranks), checked against the closed forms in `sptutor.cost`:


# %%
def simulate_causal(method, seq_len, world=4):
    """One causal call of ``method`` on fresh float64 inputs of length ``seq_len``."""
    gen = torch.Generator().manual_seed(seq_len)
    q_s, k_s, v_s, dout_s = (
        torch.randn(B, seq_len, Hq, D, generator=gen, dtype=torch.float64) for _ in range(4)
    )
    rates = decay if method in oracle.LINEAR_METHODS else None
    return oracle.simulate(method, q_s, k_s, v_s, dout_s, world=world, causal=True, decay=rates)


def cost_row(sim):
    """Bytes sent (forward + backward) and kept for backward per rank, the largest over ranks."""
    world, shape = sim.world, cost.Shape(*sim.shape, torch.float64)
    sent = [sim.ledger.bytes_sent(rank) for rank in range(world)]
    closed = cost.of(sim.method, shape, world, causal=True)
    assert sent == [f + b for f, b in zip(closed.forward, closed.backward)]  # ledger == formula
    saved = max(record.saved_bytes for record in sim.ranks)
    return dict(method=sim.method, world=world, seq_len=shape.seq_len, sent=max(sent), saved=saved)


lengths = (32, 64, 128, 256)
runs = {(m, s): simulate_causal(m, s) for m in ("lasp", "lasp2", "ring") for s in lengths}
rows = [cost_row(sim) for sim in runs.values()]
sent = {(row["method"], row["seq_len"]): row["sent"] for row in rows}
print(f"{'S':>5} {'lasp':>8} {'lasp2':>8} {'ring':>8}   bytes sent per rank, W = 4")
for s in lengths:
    print(f"{s:>5} {sent['lasp', s]:>8} {sent['lasp2', s]:>8} {sent['ring', s]:>8}")
for method in ("lasp", "lasp2"):
    assert len({sent[method, s] for s in lengths}) == 1  # equal for every S
assert sent["lasp", 32] == 2 * state_bytes  # one state forward and one back (middle ranks)
assert sent["lasp2", 32] == 2 * (W - 1) * state_bytes  # W-1 gathered states per phase
assert all(sent["ring", 2 * s] == 2 * sent["ring", s] for s in lengths[:-1])  # linear in S

# %%
plots.cost_curves(rows, x="seq_len", y="sent")
plt.show()

# %% [markdown]
# Note what the ledger says about LASP-2: per rank it puts **more** bytes on the wire than LASP,
# $W-1$ states per phase instead of one: in a bandwidth-optimal all-gather every rank puts $W-1$
# states on the wire so that each ends up with all $W$. What LASP-2 buys is not bytes but
# **latency**.
#
# ## What the chain costs: sequential steps
#
# In LASP, rank $t$ can send only what it has received: the message of step $s+1$ leaves the rank
# that received the message of step $s$. So the steps cannot overlap, and the last rank reads its
# state only after $W-1$ messages in a row (the same again, reversed, in backward). In LASP-2 every
# rank's state is ready before any message, so all of them travel in one collective. We count the
# steps in each phase from the ledger, and check the chain's dependency from it too. This is a
# count of sequential communication steps, not a wall-clock time: on 4 CPU processes the timing
# would say more about Python than about the network. (A collective is not free in latency either:
# inside, a ring all-gather also takes $W-1$ hops, but they are pipelined within one call that no
# rank's computation holds up.)


# %%
def sequential_steps(sim, phase):
    """The communication steps of one phase: message events grouped by their step label."""
    messages = [e for e in sim.ledger.messages() if e.phase == phase]
    return {
        step: [e for e in messages if e.step == step] for step in sorted({e.step for e in messages})
    }


for phase in ("forward", "backward"):
    chain = sequential_steps(sims["lasp"], phase)
    gathered = sequential_steps(sims["lasp2"], phase)
    assert len(chain) == W - 1 and len(gathered) == 1
    assert all(
        len(events) == 1 for events in chain.values()
    )  # one sender per step: the others wait
    for step in range(len(chain) - 1):  # step s+1 is sent by the rank that received step s
        assert chain[step + 1][0].rank == chain[step][0].peer
    assert {e.rank for e in gathered[0]} == set(range(W))  # every rank in the one all-gather
    senders = (
        " -> ".join(str(chain[s][0].rank) for s in chain) + f" -> {chain[len(chain) - 1][0].peer}"
    )
    print(
        f"{phase:<8} lasp: {len(chain)} sequential steps ({senders}); lasp2: {len(gathered)} step"
    )

# %% [markdown]
# ## Packed documents: the state starts afresh
#
# A training sequence often packs several documents, and no document may read another's tokens.
# `cu_seqlens`, the cumulative document lengths over the global sequence, says where they lie.
# For linear attention that means the state must **reset** at every boundary: the sums of the
# formula run over $j$ in $i$'s own document only. Nothing new is needed inside a chunk: a rank
# splits its chunk into *segments*, its runs of one document, and computes each as a chunk of
# its own (`sptutor.chain`):
#
# - only the first segment reads the incoming state, and only if it **continues** the document
#   of the previous rank's last token;
# - the outgoing state is the last segment's; the incoming state flows on into it only when the
#   chunk is that one continuing segment (it *passes*);
# - LASP-2's prefix sum stops at the most recent cut: a rank whose first segment reads adds the
#   earlier ranks' outgoing states walking back from rank t−1, up to and including the nearest
#   rank that does not pass (its last segment starts the document); one that does not read adds
#   none;
# - backward mirrors it: the dKV_out a rank receives reaches its last segment's keys and values
#   (and, when the chunk passes, flows on through it); the dKV it sends back comes from its first
#   segment, and only when that segment reads.
#
# With chunks of different lengths (below) every $\lambda^C$ above is $\lambda^{C_t}$, each
# rank's own chunk length. The messages do not change: every rank still sends its state (a
# receiver that starts a new document ignores it), so the ledger is the same whatever the
# documents. Below, S = 14 tokens over W = 4 ranks (W does not divide S: the chunks hold 4, 4, 3
# and 3 tokens) and three documents: one boundary inside rank 0's chunk, and one at rank 2's
# first token, so rank 2 ignores the state it receives.

# %%
cu_seqlens = torch.tensor([0, 3, 8, 14])
# float64 against the ground truth, the same sums reordered: 1e-12 relative is far more than
# rounding needs (the design's rule is 1e-10)
q14, k14, v14, dout14 = (torch.randn(1, 14, 2, 4, dtype=torch.float64) for _ in range(4))
packed_sims = {}
for method in ("lasp", "lasp2"):
    packed_sims[method] = oracle.simulate(method, q14, k14, v14, dout14, world=W, causal=True,
                                          decay=decay, cu_seqlens=cu_seqlens)  # fmt: skip
    truth = oracle.full_linear_attention(q14, k14, v14, True, decay, cu_seqlens=cu_seqlens)
    assert relative_error(packed_sims[method].out, truth) < 1e-12
packed = packed_sims["lasp"]
packed_chain = Chain.of(packed.positions, packed.documents)
assert packed_chain.lengths == (4, 4, 3, 3)
# the boundary at 3 cuts rank 0's chunk in two; the one at 8 falls on rank 2's edge
segment_lengths = [[s.stop - s.start for s in chunk] for chunk in packed_chain.segments]
assert segment_lengths == [[3, 1], [4], [3], [3]]
assert packed_chain.reads == (False, True, False, True)  # rank 2 starts document 2: ignores it
assert packed_chain.passes == (False, True, False, True)
for rank in range(W):
    segments = [packed.positions[rank][s].tolist() for s in packed_chain.segments[rank]]
    print(f"rank {rank}: segments {segments}, reads the incoming state: "
          f"{packed_chain.reads[rank]}, passes it on: {packed_chain.passes[rank]}")  # fmt: skip

# the second document's tokens changed: the first and third documents see nothing of it
q_changed, k_changed, v_changed = q14.clone(), k14.clone(), v14.clone()
q_changed[:, 3:8], k_changed[:, 3:8], v_changed[:, 3:8] = 7.0, -3.0, 5.0
changed = oracle.simulate("lasp", q_changed, k_changed, v_changed, dout14, world=W, causal=True,
                          decay=decay, cu_seqlens=cu_seqlens)  # fmt: skip
outside = torch.cat([torch.arange(0, 3), torch.arange(8, 14)])
assert torch.equal(changed.out[:, outside], packed.out[:, outside])
for method in ("lasp", "lasp2"):  # the same messages whatever the documents
    one_doc = oracle.simulate(method, q14, k14, v14, dout14, world=W, causal=True, decay=decay)
    one_doc_messages = [e.key() for e in one_doc.ledger.messages()]
    assert one_doc_messages == [e.key() for e in packed_sims[method].ledger.messages()]
print("documents 0 and 2 unchanged, bit for bit, when document 1 changes; the same messages")

# %% [markdown]
# The chain drawn: each rank's chunk with the documents it holds, and the state's journey. The
# arrows are the messages, the same for any documents; the reset happens inside the ranks: rank
# 0's second segment starts document 1, and rank 2 ignores the arrow that reaches it.

# %%
chain_figure = plots.state_chain(packed)
plt.show()

# %% [markdown]
# ## The real code on 4 processes
#
# Now `sptutor.lasp_attention` and `sptutor.lasp2_attention` on 4 gloo processes, one
# `sptutor.launch.Pool` started once for both. `sptutor.testing.check_sptutor` draws a sweep of
# cases with hypothesis (W = 1 to 4, on the first W processes of the pool; the contiguous layout and
# a causal mask, the case this chapter built the chain and the prefix sum for; a decay per head in
# every case, `decays=(True,)`, where the default also draws cases without; GQA; odd head dims;
# float64 and float32), runs sptutor's own method forward and backward on every rank of each case,
# and compares out, dq, dk and dv with `oracle.simulate` at the tolerance of the case's dtype
# (linear attention has no LSE). That numerical verdict is all that
# [chapter 8, *Checking your own code*](08_checking_your_code.py) asks of your code, through the
# same machinery (`sptutor.testing.check`). Here the code is sptutor's own, so
# `enforce=("messages", "saved")` also fails a case unless every rank logged exactly the oracle's
# messages (op, rank, peer, bytes, phase and step, in order: the chain's sends for LASP, the
# all-gathers for LASP-2) and kept exactly the oracle's bytes for backward. Both methods draw the
# same cases.

# %%
POOL = launch.Pool(W, timeout=60)  # 4 gloo processes, started once, for both checks
EXAMPLES = 8
reports = {}
for method in ("lasp", "lasp2"):
    # check_real: check_sptutor(method, world=4, dtypes=("float64", "float32"), enforce=("messages",
    # "saved"), pool=...), its report printed, passed and messages_exact asserted
    reports[method] = check_real(method, POOL, examples=EXAMPLES, layouts=("contiguous",),
                                 causal=(True,), decays=(True,))  # fmt: skip
POOL.close()
for method, report in reports.items():
    assert all(r.case.decay is not None for r in report.results)  # a decay per head, always
    multi_rank = report.on_several_ranks
    grouped = [r for r in multi_rank if r.case.heads_q > r.case.heads_kv]
    assert grouped
    print(f"{method}: {len(multi_rank)} of the {EXAMPLES} cases on 2 to 4 ranks, {len(grouped)} "
          "of them with GQA; every rank's messages and saved bytes equal the oracle's",
          end="\n\n")  # fmt: skip

# %% [markdown]
# ## What the paper claims, what we measured
#
# <div class="admonition note"><p class="admonition-title">What the paper claims, what we
# measured</p>
# <p><b>Claim.</b> The LASP-2 paper (Sun et al. 2025, §3.4), restating LASP's cost (the LASP
# paper's body was not available to us, only its abstract and code), says LASP's message is the
# state $KV \in [B, H, d, d]$, <i>independent of sequence length</i>: $B H d^2$ per step, with
# $W-1$ sequential point-to-point steps in forward and $W-1$ in backward, $2(W-1)\,B H d^2$ per
# iteration, against LASP-2's $2\,B H d^2$ in 2 all-gather steps. Its example:
# Linear-Llama3-1B with $B = 16$, $H = 16$, $d = 2048$ gives $B H d^2 \approx 1.07$ billion
# elements, about 2.14 GB in FP16.</p>
# <p><b>Measured.</b> The cell below reads our ledgers: every LASP message is one state of
# $B \cdot Hq \cdot D^2$ elements at every $S$ we ran, the step counts are $W-1$ per phase for LASP
# and 1 for LASP-2, and LASP's total is $2(W-1)$ states. Two differences in accounting, both in
# the numbers below: our ledger counts an all-gather as the bytes each rank puts on the wire,
# $(W-1)$ states per rank, so LASP-2 sends $W$ times LASP's total bytes in far fewer steps; and
# sptutor sends states in the accumulation dtype (float32 for FP16 inputs), so the paper's example
# state is twice its FP16 size here.</p></div>

# %%
lasp_messages_by_length = {
    s: [e.nbytes for e in runs["lasp", s].ledger.messages()] for s in lengths
}  # every LASP message at every S
state_elements = B * Hq * D * D
assert all(
    n == state_elements * torch.float64.itemsize
    for ns in lasp_messages_by_length.values()
    for n in ns
)
lasp_steps = sum(len(sequential_steps(sims["lasp"], phase)) for phase in ("forward", "backward"))
lasp2_steps = sum(len(sequential_steps(sims["lasp2"], phase)) for phase in ("forward", "backward"))
lasp_total = sims["lasp"].ledger.bytes_sent()  # all ranks, forward + backward
lasp2_total = sims["lasp2"].ledger.bytes_sent()
assert lasp_steps == 2 * (W - 1) and lasp2_steps == 2
assert lasp_total == 2 * (W - 1) * state_bytes and lasp2_total == W * lasp_total
paper = cost.Shape(batch=16, seq_len=W, heads_q=16, heads_kv=16, head_dim=2048, dtype=torch.float16)
paper_elements = paper.batch * paper.heads_q * paper.head_dim**2
paper_state = cost.of("lasp", paper, W, causal=True).forward[0]  # our message, in bytes
assert paper_state == paper_elements * torch.float32.itemsize == 2 * paper_elements * 2

table = [
    ("LASP message, elements", "B·H·d²", f"{state_elements} = B·Hq·D²"),
    ("  at S = 32, 64, 128, 256", "independent of S", "equal at all four"),
    ("LASP steps, fwd + bwd", "2(W-1)", lasp_steps),
    ("LASP-2 steps, fwd + bwd", "2", lasp2_steps),
    ("LASP, all ranks, one call", "2(W-1)·BHd²", f"{lasp_total // state_bytes} states"),
    ("LASP-2, all ranks, one call", "2·BHd²", f"{lasp2_total // state_bytes} states"),
    ("Linear-Llama3-1B state, elements", "≈ 1.07e9", f"{paper_elements:.3e}"),
    ("Linear-Llama3-1B state, GB", "≈ 2.14 FP16", f"{paper_state / 1e9:.2f} float32"),
]
print(f"{'W = 4, float64':<34}{'paper':<18}ours")
for what, claim, ours in table:
    print(f"{what:<34}{claim:<18}{ours}")

# %% [markdown]
# ## What to remember
#
# | fact | where in sptutor |
# |---|---|
# | a running $D\times D$ state replaces the $S\times S$ weights | `chunks`, the first cell |
# | chunk = intra part + readout of $KV_{p_0}$ + outgoing state | `chunks.forward` |
# | LASP: the state down a chain, $W-1$ steps per phase | `sptutor.lasp` |
# | LASP-2: one all-gather, a prefix sum on each rank | `sptutor.lasp2` |
# | bytes per rank independent of $S$; LASP-2 trades bytes for steps | `sptutor.cost` |
#
# API: [sptutor.lasp](../../api/lasp/), [sptutor.lasp2](../../api/lasp2/), the chunk maths
# [sptutor.chunks](../../api/chunks/), and the emulations
# [sptutor.oracle.lasp](../../api/oracle-lasp/) and
# [sptutor.oracle.lasp2](../../api/oracle-lasp2/).

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercises `lasp` and `lasp2` blank LASP's state chain, forward and
# backward, and LASP-2's all-gathered prefix, and the grader compares every shard and message with
# the oracle and explains the first mistake in one sentence ([Exercises](../exercises.md)).
# The emulated twin (`oracle_...`) needs no processes; the real one runs on 4:
#
# ```bash
#     sptutor exercise oracle_lasp && sptutor grade oracle_lasp.py
#     sptutor exercise lasp && sptutor grade lasp.py
#     sptutor exercise oracle_lasp2 && sptutor grade oracle_lasp2.py
#     sptutor exercise lasp2 && sptutor grade lasp2.py
# ```
