# %% [markdown]
# # 5. LSS Transformer
#
# Wang, Lyngaas, Tsaris, Chen, Dash, Shekar, Luo, Yoon, Wahib and Gouley, *Ultra-Long Sequence
# Distributed Transformer* (arXiv 2311.02382, 2023), call their method the **Long Short-Sequence
# Transformer** (LSS Transformer).
#
# <div class="admonition warning">
# <p class="admonition-title">This chapter is our reading of an abstract</p>
# <p>The paper's method section was not available to us: we could read its abstract, two
# third-party summaries and one quoted sentence, not the algorithm. sptutor's <code>lss</code> is
# <b>our reading of the abstract</b>, and so is everything this chapter says about how LSS works.
# What we implement is exact attention by construction, and the cells below check that; whether
# the paper's own method is exact (its abstract implies it loses no accuracy) could not be
# checked.</p></div>
#
# What the abstract says: LSS distributes a long sequence into segments among GPUs, "with each GPU
# computing a partial self-attention for its segment", and it "uses a fused communication and a
# novel double gradient averaging technique to avoid the need to aggregate partial
# self-attention and minimize communication overhead". We read that as three things:
#
# 1. **Forward: one fused all-gather.** K and V are stacked into one tensor `[K‖V]` and gathered
#    in a single collective, so every rank holds the keys and values of the whole sequence. Its
#    queries (its "segment") attend to all of them; the output is complete on the rank that owns
#    the queries, so nothing is aggregated. The gathered K, V are kept for backward: $O(S)$ memory
#    per rank, the price of a single collective.
# 2. **Backward: one fused reduce-scatter** of `[dK‖dV]`: each rank's share of every key's
#    gradient goes to the rank that owns that key, summed on the way.
# 3. **Double gradient averaging** of the *weight* gradients, once over the sequence-parallel
#    group and once over the data-parallel group, so that SP × DP trains like one process.

# %% tags=["hide-input"]

import matplotlib.pyplot as plt
import torch

from sptutor import cost, launch, layout, oracle, parallel, plots, train
from sptutor import lss as real_lss
from sptutor.model import GPTConfig, TinyGPT
from sptutor.notebook import check_real, show
from sptutor.oracle import lss as oracle_lss
from sptutor.testing import relative_error

_ = torch.manual_seed(0)  # seeded: every number below is reproducible

# %% [markdown]
# ## Forward: one all-gather of [K‖V]
#
# Rank r holds `q: (B, S/W, Hq, D)` and `k, v: (B, S/W, Hkv, D)`. It stacks its keys and values
# into `(2, B, S/W, Hkv, D)`, and one all-gather gives every rank all W of them,
# `(W, 2, B, S/W, Hkv, D)`. Then its queries attend to each gathered block (masks from the block
# owner's global positions, fully masked blocks skipped), and the partial results merge by their
# log-sum-exp exactly as in [chapter 0](00_attention_in_blocks.py):
#
# $$(o^r, \text{lse}^r) = \operatorname{merge}_{\text{src}=0}^{W-1}
# \operatorname{attention}(Q^r, K_{\text{src}}, V_{\text{src}}), \qquad
# o^r = \sum_{\text{src}} e^{\text{lse}^r_{\text{src}} - \text{lse}^r}\, o^r_{\text{src}} .$$
#
# In the oracle (every rank in one loop; `world.all_gather` takes and returns per-rank lists):

# %% tags=["hide-input"]
show(oracle_lss._forward)

# %% [markdown]
# and in the real code, one process per rank (`comm.all_gather`, and the block computed by the
# chosen backend, plain torch or our Triton kernel):

# %% tags=["hide-input"]
show(real_lss._forward)

# %% [markdown]
# ## Backward: one reduce-scatter of [dK‖dV]
#
# Given the final output and LSE, every block's FlashAttention-2 backward gives this rank's share
# of that block's gradients ([chapter 0](00_attention_in_blocks.py)). dQ stays here (the sum over
# blocks); the shares of $dK_{\text{src}}, dV_{\text{src}}$ belong to rank src, and every rank has
# one for every block:
#
# $$dK_{\text{src}} = \sum_{r=0}^{W-1} dK^{(r)}_{\text{src}}, \qquad
# dV_{\text{src}} = \sum_{r=0}^{W-1} dV^{(r)}_{\text{src}} .$$
#
# "Sum over ranks, deliver block src to rank src" is a reduce-scatter; stacking dK and dV makes it
# one collective. The oracle:

# %% tags=["hide-input"]
show(oracle_lss._backward)

# %% [markdown]
# and the real code:

# %% tags=["hide-input"]
show(real_lss._backward)

# %% [markdown]
# ## Exact: the emulation against full attention
#
# On our reading LSS computes the same sums as full attention, regrouped, so in float64 it must
# equal plain full attention to rounding (tolerance $10^{-10}$ relative), for every layout, with
# or without a causal mask, with fewer K/V heads than query heads (GQA) or not:

# %%
B, S, D, W = 1, 16, 8, 4
rows = []
for heads_q, heads_kv in ((2, 2), (4, 2)):
    q, dout = (torch.randn(B, S, heads_q, D, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, S, heads_kv, D, dtype=torch.float64) for _ in range(2))
    for lay in ("contiguous", "zigzag", "striped"):
        for causal in (False, True):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out, lse = oracle.full_attention(*leaves, causal=causal)
            out.backward(dout)
            truth = (out.detach(), lse, *(x.grad for x in leaves))
            sim = oracle.simulate("lss", q, k, v, dout, world=W, causal=causal, layout=lay)
            names = ("out", "lse", "dq", "dk", "dv")
            worst = max(relative_error(getattr(sim, n), t) for n, t in zip(names, truth))
            assert worst < 1e-10, (heads_q, heads_kv, lay, causal, worst)
            rows.append((heads_q, heads_kv, lay, causal, worst))
print(f"{'Hq':>2} {'Hkv':>3} {'layout':10} {'causal':6} worst error of out, lse, dq, dk, dv")
for heads_q, heads_kv, lay, causal, worst in rows:
    print(f"{heads_q:>2} {heads_kv:>3} {lay:10} {causal!s:6} {worst:.1e}")

# %% [markdown]
# ## Two collectives per attention layer
#
# Per rank, the ledger holds one all-gather in forward and one reduce-scatter in backward, nothing
# else. The forward moves exactly the bytes ring attention's forward moves,
# $2(W-1)\cdot B\cdot\frac{S}{W}\cdot H_{kv}\cdot D$ elements, in one collective instead of
# 2(W−1) sends; the backward only the gradients, not the keys and values again:

# %%
q, k, v, dout = (torch.randn(B, S, 2, D, dtype=torch.float64) for _ in range(4))
sim = oracle.simulate("lss", q, k, v, dout, world=W, causal=True)
ring_sim = oracle.simulate("ring", q, k, v, dout, world=W, causal=True)
expected = cost.lss(cost.Shape.of(q, k), W)
kv_elements = B * (S // W) * 2 * D  # B·(S/W)·Hkv·D
for rank in range(W):
    assert [(e.op, e.phase) for e in sim.ledger.messages(rank)] == [
        ("all_gather", "forward"),
        ("reduce_scatter", "backward"),
    ]
    forward = sim.ledger.bytes_sent(rank=rank, phase="forward")
    backward = sim.ledger.bytes_sent(rank=rank, phase="backward")
    assert forward == expected.forward[rank] == 2 * (W - 1) * kv_elements * 8
    assert backward == expected.backward[rank] == 2 * (W - 1) * kv_elements * 8
    assert forward == ring_sim.ledger.bytes_sent(rank=rank, phase="forward")
print(f"{'method':6} {'messages':>8} {'forward B':>10} {'backward B':>11}   (rank 0, W={W})")
for name, run in (("lss", sim), ("ring", ring_sim)):
    count = len(run.ledger.messages(0))
    fwd, bwd = (run.ledger.bytes_sent(rank=0, phase=p) for p in ("forward", "backward"))
    print(f"{name:6} {count:>8} {fwd:>10,} {bwd:>11,}")

# %% [markdown]
# ## The price: the gathered K and V are kept, O(S) per rank
#
# What each rank keeps for backward (`sim.ranks[r].saved_bytes`): its q, out and LSE, which shrink
# with W, and the gathered K and V of the **whole** sequence, $2\cdot B\cdot S\cdot H_{kv}\cdot D$
# elements, which do not. Ring attention, for contrast, keeps only its own shards (K and V come
# round again in backward). Measured, float64, B = 1, Hq = Hkv = 2, D = 8:

# %%
print(f"{'S':>4} {'W':>2} {'lss saved B':>12} {'of which gathered K,V':>22} {'ring saved B':>13}")
gathered_by_seq = {}
for seq_len in (32, 64, 128):
    for world in (2, 4, 8):
        x = [torch.randn(B, seq_len, 2, D, dtype=torch.float64) for _ in range(3)]
        lss_saved = {r.saved_bytes for r in oracle.simulate("lss", *x, world=world).ranks}
        ring_saved = {r.saved_bytes for r in oracle.simulate("ring", *x, world=world).ranks}
        assert len(lss_saved) == len(ring_saved) == 1  # the same on every rank
        saved, ring_bytes = lss_saved.pop(), ring_saved.pop()
        shape = cost.Shape(B, seq_len, 2, 2, D, torch.float64)
        assert saved == cost.lss(shape, world).saved[0]
        assert ring_bytes == cost.ring(shape, world).saved[0]
        local = 2 * shape.tokens_bytes(seq_len // world, 2) + B * 2 * (seq_len // world) * 8
        gathered = saved - local  # minus q, out (B, S/W, Hq, D) and lse (B, Hq, S/W)
        assert gathered == 2 * B * seq_len * 2 * D * 8  # 2·B·S·Hkv·D, whatever W
        gathered_by_seq.setdefault(seq_len, set()).add(gathered)
        print(f"{seq_len:>4} {world:>2} {saved:>12,} {gathered:>22,} {ring_bytes:>13,}")
assert all(len(sizes) == 1 for sizes in gathered_by_seq.values())  # independent of W
gathered = {seq_len: min(sizes) for seq_len, sizes in gathered_by_seq.items()}
assert gathered[64] == 2 * gathered[32] and gathered[128] == 2 * gathered[64]  # doubles with S

# %% [markdown]
# ## Pictures of the call
#
# The schedule of the causal call above: one all-gather band across all ranks, then each rank's
# blocks (shaded by their useful multiply-adds, numbered by whose K/V block they use), then the
# backward's blocks and one reduce-scatter. With contiguous shards and a causal mask, rank r
# computes r + 1 blocks: the last rank four, the first one. That is the load imbalance of
# [chapter 2](02_ring_attention.py), and the zigzag layout evens it out here too.

# %%
forward_blocks = [
    sum(e.op == "compute" and e.phase == "forward" for e in sim.ledger.events if e.rank == rank)
    for rank in range(W)
]
assert forward_blocks == [rank + 1 for rank in range(W)]
print("blocks computed in forward, per rank:", forward_blocks)
figure, axes = plt.subplots(figsize=(10, 3.6), layout="constrained")  # one band per phase: wide
plots.schedule(sim, ax=axes)
plt.show()

# %% [markdown]
# Who computes each (query, key) pair: the rank that owns the query, against keys it gathered
# (the tile number is the step of the compute event; everything happens at step 0, after the
# single gather).

# %%
plots.ownership(sim)
plt.show()

# %% [markdown]
# ## The real code on 4 processes, and one SP × DP training step
#
# One `sptutor.launch.Pool` of 4 gloo processes, started once, serves this section: first a check
# of the real `sptutor.lss_attention` against the oracle, then one training step of the tiny GPT
# of `sptutor.model` with LSS attention, on a grid of SP = 2 × DP = 2 ranks.
#
# `sptutor.testing.check_sptutor` draws a sweep of cases with hypothesis (W = 1 to 4, on the first W
# processes of the pool; the three layouts; causal or not; GQA; odd head dims; float64 and float32),
# runs sptutor's own `lss_attention` forward and backward on every rank of each case, and compares
# out, the LSE, dq, dk and dv with `oracle.simulate` at the tolerance of the case's dtype. That
# numerical verdict is all that [chapter 8, *Checking your own code*](08_checking_your_code.py) asks
# of your code, through the same machinery (`sptutor.testing.check`). Here the code is sptutor's
# own, so `enforce=("messages", "saved")` also fails a case unless every rank logged exactly the
# oracle's messages (op, rank, peer, bytes, phase and step, in order: here one all-gather and one
# reduce-scatter) and kept exactly the oracle's bytes for backward.

# %%
POOL = launch.Pool(4, timeout=60)  # the section's 4 processes, started once
EXAMPLES = 8
# check_real: check_sptutor(method, world=4, dtypes=("float64", "float32"), enforce=("messages",
# "saved"), pool=...), its report printed, passed and messages_exact asserted
report = check_real("lss", POOL, examples=EXAMPLES, layouts=layout.LAYOUTS, causal=(False, True))
multi_rank = report.on_several_ranks
# on 2 to 4 ranks the verdict compared each rank's ledger with the oracle's, event by event:
# two messages each, the all-gather of [K‖V] and the reduce-scatter of [dK‖dV]
exact = "messages: as the oracle's, exactly (2 logged)"
assert multi_rank and all(v.information[0] == exact for r in multi_rank for v in r.verdicts)
print(f"{len(multi_rank)} of the {EXAMPLES} cases ran on 2 to 4 ranks: every rank's two "
      "messages and its saved bytes equal the oracle's")  # fmt: skip

# %% [markdown]
# **Double gradient averaging**, as we read it. Each rank's loss is its tokens' share of its
# replica's mean loss, $\mathcal{L}_r = \frac{1}{BS}\sum_{b}\sum_{i \in P_r} \ell_{b,i}$ (divided
# by the *global* token count), so the shares of one replica add up to its mean. Every rank holds
# the whole model, so the gradient of a replica's loss is the **sum** of its SP ranks' gradients,
# and the gradient of the global batch is the **mean** over the DP replicas:
#
# $$\nabla_\theta \mathcal{L}_{\text{global}} = \frac{1}{dp}\sum_{d=0}^{dp-1}\;
# \sum_{r=0}^{sp-1} \frac{\partial \mathcal{L}^{(d)}}{\partial \theta^{(d,r)}} .$$
#
# (The attention's own backward already carried every rank's share home to the keys it owns:
# that was the reduce-scatter.) In `sptutor.parallel`, the two averages are two all-reduces:

# %% tags=["hide-input"]
show(parallel.average_gradients)

# %% [markdown]
# The training step runs on the same 4 processes (`POOL.run`, which ships the function below by
# value and runs it on every rank); back here, the step is repeated on one process with full
# attention over the whole global batch, and every gradient is compared.

# %%
CONFIG = GPTConfig(vocab=13, d_model=16, heads_q=4, heads_kv=2, layers=2, seq_len=16,
                   attention="lss", layout="zigzag", dtype="float64")  # fmt: skip
SP, DP, REPLICA_BATCH = 2, 2, 2
windows = torch.randint(0, CONFIG.vocab, (DP * REPLICA_BATCH, CONFIG.seq_len + 1))
inputs, targets = windows[:, :-1], windows[:, 1:]  # the next tokens, taken before sharding


def training_step(rank, world, inputs, targets):
    """One SP × DP step: this rank's loss share and its gradients after double averaging."""
    grid = parallel.make_grid(SP, DP)  # collective: every rank makes every group
    model = TinyGPT(CONFIG)  # seeded: the same weights on every rank
    ids, next_ids = train.local_batch(inputs, targets, grid, CONFIG)  # (B, S/W) each
    loss = model(ids, next_ids, group=grid.sp_group)
    loss.backward()
    parallel.average_gradients(model, grid)  # sum over SP, mean over DP
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


results = POOL.run(training_step, args=(inputs, targets))
POOL.close()

baseline = TinyGPT(CONFIG.baseline())  # full attention, one process, the whole global batch
baseline_loss = baseline(inputs, targets)
baseline_loss.backward()
loss_sum = sum(loss for loss, _ in results) / DP  # shares summed over SP, averaged over DP
assert abs(loss_sum - baseline_loss.item()) <= 1e-10 * baseline_loss.item()
worst_grad = 0.0
for _, grads in results:
    for name, param in baseline.named_parameters():
        error = relative_error(grads[name], param.grad)
        assert error <= 1e-10, (name, error)  # float64, the same maths reordered
        worst_grad = max(worst_grad, error)
print(f"SP=2 x DP=2 step: loss {loss_sum:.12f}, one process {baseline_loss.item():.12f}")
print(f"{len(grads)} gradient tensors x 4 ranks: worst relative error {worst_grad:.1e}")

# %% [markdown]
# ## Loss curves coincide
#
# `sptutor.train.run` is what `sptutor train` runs: the same tiny GPT trained with AdamW on a
# shipped essay, here with LSS on SP = 2 × DP = 2 processes, and with `baseline=True` the same
# model trained first on one process with full attention. In float64 the two curves must agree
# step by step to $10^{-10}$ relative:

# %%
run_config = train.TrainConfig(method="lss", world=4, dp=2, layout="zigzag", dtype="float64",
                               steps=5, batch=2, seq_len=32, d_model=32)  # fmt: skip
result = train.run(run_config, baseline=True, verbose=False)
assert len(result.losses) == len(result.baseline_losses) == run_config.steps
print(f"{'step':>4} {'lss, 4 processes':>17} {'full, 1 process':>16} {'relative diff':>14}")
for step, (loss, reference) in enumerate(zip(result.losses, result.baseline_losses), start=1):
    difference = abs(loss - reference) / abs(reference)
    assert difference <= 1e-10, (step, loss, reference)
    print(f"{step:>4} {loss:>17.12f} {reference:>16.12f} {difference:>14.1e}")
figure, axes = plt.subplots(figsize=(5, 3))
steps = range(1, run_config.steps + 1)
axes.plot(steps, result.baseline_losses, "o-", lw=4, alpha=0.4, label="full attention, 1 process")
axes.plot(steps, result.losses, "x--", color="black", label="lss, SP=2 × DP=2")
axes.set(xlabel="step", ylabel="loss", xticks=list(steps), title="The two loss curves")
axes.legend()
figure.tight_layout()

# %% [markdown]
# <div class="admonition note">
# <p class="admonition-title">What the paper claims, what we measured</p>
# <p><b>The paper</b> (its abstract): on the enwik8 data set, LSS is 5.6× faster and 10.2× more
# memory-efficient than state-of-the-art Nvidia sequence parallelism on 144 Nvidia V100 GPUs, and
# it scales to a sequence length of 50,112 on 3,456 GPUs with 161% super-linear parallel
# efficiency and a throughput of 32 petaflops. A sentence of its §3, quoted by a third-party page,
# says the Nvidia baseline needs "8 global communications per attention layer (4 in forward pass
# and 4 in backward pass)". We could not read how LSS gets its numbers, nor whether it is exact.
# </p>
# <p><b>We measured</b> (cells above), for <i>our reading</i>: exact attention (float64, every
# layout, causal or not, GQA, within $10^{-10}$ of full attention); two collectives per attention
# layer and rank, one all-gather of $[K‖V]$ forward and one reduce-scatter of $[dK‖dV]$
# backward, whose bytes equal <code>sptutor.cost.lss</code>; the forward bytes of ring attention
# in one collective; the gathered K, V kept for backward, a part that doubles with S and does
# not shrink with W. The real code on 4 processes equals the oracle message for message; one
# SP × DP training step with double gradient averaging equals the single-process step, and five
# training steps give the single-process loss curve, both within $10^{-10}$. None of this tests
# the paper's speed, memory or scaling claims, which need its method and its GPUs.</p></div>
#
# API: [sptutor.lss](../api/lss.md) (the real code), [sptutor.oracle.lss](../api/oracle-lss.md)
# (the emulation), [sptutor.parallel](../api/parallel.md) (the grid and double gradient
# averaging), [sptutor.train](../api/train.md); the [Training](../training.md) page derives the
# gradient rule at length.

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercise `lss` blanks LSS's all-gather forward and its reduce-scatter
# backward, and the grader compares every shard and message with the oracle and explains the first
# mistake in one sentence ([Exercises](../exercises.md)).
# The emulated twin (`oracle_...`) needs no processes; the real one runs on 4:
#
# ```bash
#     sptutor exercise oracle_lss && sptutor grade oracle_lss.py
#     sptutor exercise lss && sptutor grade lss.py
# ```
