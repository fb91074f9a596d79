# %% [markdown]
# # 0. Attention in blocks
#
# Every sequence-parallel method in sptutor cuts attention into **blocks**: a rank holds some
# queries, and the keys and values arrive (or are gathered) a block at a time. This chapter shows
# the three facts that make such a cut exact, each checked by a cell that computes it:
#
# 1. the **log-sum-exp** (LSE) of a row of scores summarises everything a softmax needs;
# 2. two partial results over disjoint key blocks **merge** into the full result by their LSE
#    (the *online softmax*);
# 3. masks built from **global positions** let one block primitive serve any assignment of tokens
#    to ranks, and the **FlashAttention-2 backward** of a block, given the final output and LSE,
#    gives gradients that simply add up over blocks.
#
# Tensors are `(B, S, H, D)`: batch, sequence, heads, head dim (sequence before heads).

# %% tags=["hide-input"]

import torch

from sptutor import blocks, fused, fused_plan, layout, oracle
from sptutor.notebook import show
from sptutor.testing import relative_error

_ = torch.manual_seed(0)  # seeded: every number below is reproducible

# %% [markdown]
# ## Softmax attention and its log-sum-exp
#
# For one query $q_i$ and keys $k_1 \dots k_S$ the scores are $s_{ij} = \text{scale}\cdot q_i
# \cdot k_j$ (scale $= D^{-1/2}$), the weights $p_{ij} = e^{s_{ij}} / \sum_j e^{s_{ij}}$ and the
# output $o_i = \sum_j p_{ij} v_j$. The **log-sum-exp** of the row,
#
# $$\text{lse}_i = \log \sum_j e^{s_{ij}},$$
#
# is the normaliser in log space: $p_{ij} = e^{s_{ij} - \text{lse}_i}$. sptutor's ground truth,
# `oracle.full_attention`, is plain full-matrix attention that returns both `out` and `lse`.

# %%
B, S, H, D = 1, 16, 2, 8
q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
out, lse = oracle.full_attention(q, k, v)
scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5  # (B, H, S, S)
probs = torch.exp(scores - lse[..., None])  # p = exp(s - lse), (B, H, S, S)
row_sums = probs.sum(-1)
assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-12)
print(f"out {tuple(out.shape)}, lse {tuple(lse.shape)}; rows of exp(s - lse) sum to 1")

# %% [markdown]
# ## Two blocks of keys merge by their LSE
#
# Split the keys into two disjoint blocks $A$ and $B$ and attend to each alone: each part is
# normalised over its own keys, $o^A$ with $\text{lse}^A$ and $o^B$ with $\text{lse}^B$. The whole
# row's normaliser is $e^{\text{lse}} = e^{\text{lse}^A} + e^{\text{lse}^B}$, so
#
# $$\text{lse} = \log\left(e^{\text{lse}^A} + e^{\text{lse}^B}\right), \qquad
# o = e^{\text{lse}^A - \text{lse}}\, o^A + e^{\text{lse}^B - \text{lse}}\, o^B .$$
#
# Computed with the larger LSE factored out, this never overflows. It is `blocks.merge`:

# %% tags=["hide-input"]
show(blocks.merge)

# %% [markdown]
# A ring of W ranks applies it W−1 times, once per block that arrives. Here the 16 keys are cut
# into 4 blocks of 4, attended to one at a time and merged in order:

# %%
positions = torch.arange(S)
merged_out = torch.zeros(B, S, H, D, dtype=torch.float64)
merged_lse = torch.full((B, H, S), float("-inf"), dtype=torch.float64)
for block in positions.split(4):
    block_out, block_lse = blocks.attention_block(
        q, k[:, block], v[:, block], positions, block, False, D**-0.5
    )
    merged_out, merged_lse = blocks.merge(merged_out, merged_lse, block_out, block_lse)
merge_error = relative_error(merged_out, out)
assert merge_error < 1e-14  # the same sums, reordered: float64 rounding only
print(f"4 blocks merged by LSE vs full attention: relative error {merge_error:.1e}")

# %% [markdown]
# ## Masks from global positions
#
# Under a causal mask the query at global position $i$ sees the keys at positions $j \le i$.
# sptutor never assumes which block comes first: a block carries the **global positions** of its
# tokens and the mask is `q_pos[:, None] >= k_pos[None, :]`. So the same primitive works whatever
# tokens a rank owns, for instance the **zigzag** layout, where rank r of W owns chunks r and
# 2W−1−r of 2W:

# %%
W = 4
for rank in range(W):
    print(f"rank {rank} owns", layout.positions(S, world=W, rank=rank, layout="zigzag").tolist())

# %% [markdown]
# Each rank attends its own queries to every rank's block of keys, with masks from the blocks'
# positions; merging gives causal attention exactly, even though no rank's tokens are contiguous:

# %%
causal_out, causal_lse = oracle.full_attention(q, k, v, causal=True)
owned = layout.all_positions(S, world=W, layout="zigzag")
worst = 0.0
for q_pos in owned:
    rank_out = torch.zeros(B, len(q_pos), H, D, dtype=torch.float64)
    rank_lse = torch.full((B, H, len(q_pos)), float("-inf"), dtype=torch.float64)
    for k_pos in owned:
        if not blocks.any_visible(q_pos, k_pos, True):
            continue  # a fully masked block: nothing to compute
        block_out, block_lse = blocks.attention_block(
            q[:, q_pos], k[:, k_pos], v[:, k_pos], q_pos, k_pos, True, D**-0.5
        )
        rank_out, rank_lse = blocks.merge(rank_out, rank_lse, block_out, block_lse)
    worst = max(worst, relative_error(rank_out, causal_out[:, q_pos]))
assert worst < 1e-14
print(f"zigzag, causal, merged per rank vs full causal attention: worst error {worst:.1e}")

# %% [markdown]
# ## The backward of one block
#
# FlashAttention-2 does not store the probabilities. Given the **final** output $o$ and LSE of
# the rows (over all keys), a block recomputes its share $P = e^{S - \text{lse}}$ and, with
# $\delta_i = \sum_d dO_{id}\, O_{id}$,
#
# $$dV = P^\top dO, \quad dP = dO\, V^\top, \quad dS = P \odot (dP - \delta), \quad
# dQ = \text{scale}\; dS\, K, \quad dK = \text{scale}\; dS^\top Q .$$
#
# Because $P$ uses the final LSE, each block's $dQ$ is its exact share of the full gradient:
# summed over blocks they give the gradient of full attention. That is why a ring can send
# $dK$, $dV$ accumulators around with the blocks and add as it goes.

# %% tags=["hide-input"]
show(blocks.attention_block_backward)

# %%
q_grad, k_grad, v_grad = (x.clone().requires_grad_() for x in (q, k, v))
full, _ = oracle.full_attention(q_grad, k_grad, v_grad, causal=True)
dout = torch.randn_like(full)
full.backward(dout)
dq = torch.zeros_like(q)
for block in positions.split(4):  # the final out and lse, block by block
    block_dq, block_dk, block_dv = blocks.attention_block_backward(
        dout, q, k[:, block], v[:, block], causal_out, causal_lse, positions, block, True, D**-0.5
    )
    dq += block_dq
    dk_error = relative_error(block_dk, k_grad.grad[:, block])
    dv_error = relative_error(block_dv, v_grad.grad[:, block])
    assert dk_error < 1e-12 and dv_error < 1e-12
dq_error = relative_error(dq, q_grad.grad)
assert dq_error < 1e-12
print(f"dq summed over 4 blocks vs autograd of full attention: relative error {dq_error:.1e}")

# %% [markdown]
# ## The same blocks on a fused kernel
#
# `sptutor.blocks` is written to be read: it builds the whole $S_q \times S_k$ score matrix of a
# block and makes several passes over it. The real code on CPU (`backend="auto"`) runs the same
# contract on torch's fused CPU flash-attention kernel instead (`sptutor.fused`), which never
# materialises scores. That kernel knows two masks for free, none and a top-left causal diagonal,
# so `fused_plan.plan` cuts a block into runs of consecutive positions and asks for one call per
# pair of runs that sees anything. In the zigzag layout above rank 3 holds positions 6 to 9 (its
# two chunks happen to touch) and rank 1 holds 2, 3, 12 and 13: every query of rank 3 sees keys 2
# and 3 and none sees 12 or 13, so the block is one call with no mask, on half the keys.

# %%
q_pos, k_pos = owned[3], owned[1]
assert q_pos.tolist() == [6, 7, 8, 9] and k_pos.tolist() == [2, 3, 12, 13]
for task in fused_plan.plan(q_pos, k_pos, True):
    print(f"queries {q_pos[task.q_lo].item()}..{q_pos[task.q_hi - 1].item()} against keys "
          f"{k_pos[task.k_lo].item()}..{k_pos[task.k_hi - 1].item()}: {task.kind}")  # fmt: skip
assert [task.kind for task in fused_plan.plan(q_pos, k_pos, True)] == ["full"]
slow = blocks.attention_block(q[:, q_pos], k[:, k_pos], v[:, k_pos], q_pos, k_pos, True, D**-0.5)
fast = fused.attention_forward(q[:, q_pos], k[:, k_pos], v[:, k_pos], q_pos, k_pos, True, D**-0.5)
fused_error = max(relative_error(a, b) for a, b in zip(fast, slow))
assert fused_error < 1e-12  # float64 both: the same sums in another order
print(f"fused vs blocks on that block (out and LSE): relative error {fused_error:.1e}")

# %% [markdown]
# One trap sits in the kernel: a query row that sees no key at all comes back with LSE 0, not
# $-\infty$, and an LSE of 0 would weigh an empty block as if it held probability mass in the
# merge. `sptutor.fused` sets those rows to LSE $-\infty$ and output 0, as `blocks` does.

# %% [markdown]
# ## What to remember
#
# | fact | where in sptutor |
# |---|---|
# | a block's output and LSE summarise it | `blocks.attention_block` |
# | partial results merge exactly by LSE | `blocks.merge` |
# | masks come from global positions | `blocks.visible_pairs`, `sptutor.layout` |
# | block gradients add up given the final out and LSE | `blocks.attention_block_backward` |
# | the same contract on torch's fused CPU kernel | `sptutor.fused`, `fused_plan.plan` |
#
# The ground truth these are checked against, `oracle.reference`, is written independently of
# `blocks`: full score matrices, nothing clever. The next chapters build each paper's method
# from these blocks, first in the oracle, then on real processes.
#
# Read next: [1. Ring Self-Attention](01_ring_self_attention.py); the functions used here are in
# the API pages [sptutor.blocks](../api/blocks.md) and
# [sptutor.oracle.reference](../api/oracle-reference.md).

# %% [markdown]
# ## Exercise
#
# Write it yourself: the exercise `blocks` blanks chapter 0's two pieces: `merge`, the LSE merge,
# and one block's backward, and the grader compares every shard and message with the oracle and
# explains the first mistake in one sentence ([Exercises](../exercises.md)).
#
# ```bash
#     sptutor exercise blocks && sptutor grade blocks.py
# ```
