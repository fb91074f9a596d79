# %% [markdown]
# # 8. Checking your own code
#
# Chapters 0 to 7 checked sptutor against its oracle. This one is for the ring you write
# yourself, in your own project, with your own signature. `sptutor.testing.check` runs your
# per-rank function on W gloo processes over a sweep of cases drawn by hypothesis (world sizes 1
# to W, causal or not, GQA, odd head dims, several lengths, the dtypes you name), compares every
# rank's out, LSE, dq, dk and dv with the oracle's, and, when a case fails, shrinks it to the
# smallest case that still fails and says in words what is wrong there and which common mistake
# it looks like.
#
# The chapter writes a small ring attention on plain `torch.distributed`, checks it, plants four
# mistakes in it one at a time and reads what the checker says about each. Then it looks at the
# messages the checker sees, and at the few options that let it call code written to other
# conventions.

# %% tags=["hide-input"]
import dataclasses
import math
import re

import torch
import torch.distributed as dist

import sptutor.checker
from sptutor import launch
from sptutor.notebook import show
from sptutor.oracle import reference
from sptutor.testing import (
    BASELINE_FACTOR,
    Case,
    check,
    random_inputs,
    relative_error,
    tolerance,
)

# %% [markdown]
# ## What "right" means
#
# A sequence-parallel attention computes the same sums as full attention, in another order and
# split over ranks. So there is one right answer for every rank: the oracle's shard of out, LSE,
# dq, dk and dv for that rank, computed in float64 on the same inputs. Rank r's result is right
# when, for each of the five tensors,
#
# $$\frac{\lVert \text{yours}_r - \text{oracle}_r \rVert}{\lVert \text{oracle}_r \rVert}
# \le \text{tolerance}(\text{dtype}) .$$
#
# The error is relative to the scale of the right tensor, so one rule serves outputs of any
# size: multiply V by 1000 and out, and its rounding error, grow about 1000-fold, but their
# ratio does not. The tolerance depends on the dtype your code computes in: $10^{-10}$ for
# float64 (the same maths reordered; the ring below stays under $10^{-15}$) and $10^{-5}$ for
# float32 (unit roundoff $6 \cdot 10^{-8}$, with room for the growth of long sums). Rounding
# and a real mistake are far apart. Here, on one causal case, are plain attention computed in
# float32, the same in bfloat16, and one real mistake (each query forgets its own key), all
# against float64:

# %% tags=["hide-input"]
show(relative_error)

# %%
q, k, v, _ = random_inputs(1, 64, 2, 2, 16, seed=0)  # float64 (B, S, H, D)
truth, _ = reference.full_attention(q, k, v, causal=True)
in_float32, _ = reference.full_attention(q.float(), k.float(), v.float(), causal=True)
in_bfloat16, _ = reference.full_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
positions = torch.arange(64)
strict, _ = reference.full_attention(q, k, v, causal=True, q_pos=positions, k_pos=positions + 1)
errors = {
    "float32 rounding": relative_error(in_float32, truth),
    "bfloat16 rounding": relative_error(in_bfloat16, truth),
    "a strict causal mask": relative_error(strict, truth),
}
assert tolerance(torch.float64) == 1e-10 and tolerance(torch.float32) == 1e-5
assert f"{torch.finfo(torch.float32).eps / 2:.0e}" == "6e-08"  # float32's unit roundoff
assert errors["float32 rounding"] < tolerance(torch.float32) / 50  # about 1e-7
assert 1e-3 < errors["bfloat16 rounding"] < 1e-2
assert errors["a strict causal mask"] > 0.1
for what, error in errors.items():
    print(f"{what:>21}: relative error {error:.1e}")

big_truth, _ = reference.full_attention(q, k, 1000 * v, causal=True)
big_float32, _ = reference.full_attention(q.float(), k.float(), 1000 * v.float(), causal=True)
absolute = [(in_float32 - truth).abs().max(), (big_float32 - big_truth).abs().max()]
relative = [errors["float32 rounding"], relative_error(big_float32, big_truth)]
assert 500 < absolute[1] / absolute[0] < 2000  # the absolute error grows with V's scale...
assert 0.5 < relative[1] / relative[0] < 2  # ...the relative error does not
print(f"\nV x 1000: largest absolute error {absolute[0]:.1e} -> {absolute[1]:.1e}, "
      f"relative {relative[0]:.1e} -> {relative[1]:.1e}")  # fmt: skip

# %% [markdown]
# bfloat16 is already off by a few $10^{-3}$ in plain attention, and how much depends on S, D
# and the data, so no fixed number is honest for 16-bit dtypes. There the rule is "no worse
# than the naive baseline": your error may be at most 2 times (3 times for gradients) that of
# plain torch attention computed in the same dtype on the same inputs.

# %%
assert BASELINE_FACTOR == {"output": 2.0, "gradient": 3.0}
print("16-bit: at most", BASELINE_FACTOR, "times the error of plain attention in that dtype")

# %% [markdown]
# ## A ring of your own
#
# Here is a ring attention as one might write it in a project of one's own, on plain
# `torch.distributed` and nothing from sptutor. It takes `(B, H, S/W, D)` shards, as
# `scaled_dot_product_attention` does, calls its flag `is_causal`, and returns `(out, lse)`. The
# backward is left to autograd: the only hand-written gradient is that of one hop of the ring,
# whose gradient is the same hop run backwards.


# %%
def contiguous(rank: int, world: int, seq_len: int) -> torch.Tensor:
    """The global positions ``rank`` holds when the sequence is cut into W runs: (S/W,)."""
    per_rank = seq_len // world
    return torch.arange(rank * per_rank, (rank + 1) * per_rank)


def exchange(x: torch.Tensor, group, shift: int) -> torch.Tensor:
    """Send x to group rank (rank + shift) mod W; return what rank (rank - shift) mod W sent."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + shift) % world)  # P2P takes global ranks
    receive_from = dist.get_global_rank(group, (rank - shift) % world)
    # a gradient autograd hands to backward need not be contiguous, and gloo's buffers must be
    received = torch.empty_like(x, memory_format=torch.contiguous_format)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to, group),
           dist.P2POp(dist.irecv, received, receive_from, group)]  # fmt: skip
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class RingPass(torch.autograd.Function):
    """One hop: x goes ``shift`` ranks ahead; its gradient goes the same hop backwards."""

    @staticmethod
    def forward(ctx, x, group, shift):
        ctx.group, ctx.shift = group, shift
        return exchange(x, group, shift)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.group, -ctx.shift), None, None


def pass_to_next(x: torch.Tensor, group) -> torch.Tensor:
    """The ring's hop: x to rank + 1; returns the block rank - 1 held."""
    return RingPass.apply(x, group, 1)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(Sq, Sk): True where a query may see a key, at or before its own position."""
    return q_pos[:, None] >= k_pos[None, :]


def attend(q, k, v, q_pos, k_pos, is_causal: bool, visible=causal_mask):
    """One block: q (B, H, Sq, D) against k, v (B, Hkv, Sk, D) at global positions q_pos (Sq,)
    and k_pos (Sk,). Returns out (B, H, Sq, D) and lse (B, H, Sq)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))  # GQA: (B, H, Sk, D)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~visible(q_pos, k_pos), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # a row that sees no key: zeros
    return probs @ v, lse


def merge_by_lse(out, lse, block_out, block_lse):
    """Online softmax: weigh both partial outputs by their share of the new log-sum-exp."""
    new_lse = torch.logaddexp(lse, block_lse)
    old_weight = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]  # -inf - -inf: no keys yet
    new_weight = torch.exp(block_lse - new_lse).nan_to_num(0.0)[..., None]
    return out * old_weight + block_out * new_weight, new_lse


def my_ring(q, k, v, *, is_causal=False, group=None, positions=contiguous,
            visible=causal_mask, merge=merge_by_lse, pass_on=pass_to_next):  # fmt: skip
    """Ring attention on this rank's shards: q (B, H, S/W, D), k, v (B, Hkv, S/W, D).
    Returns out (B, H, S/W, D) and lse (B, H, S/W)."""
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len = world * q.shape[2]
    q_pos = positions(rank, world, seq_len).to(q.device)
    out, lse = torch.zeros_like(q), torch.full_like(q[..., 0], -math.inf)  # nothing merged yet
    for step in range(world):
        source = (rank - step) % world  # whose block we hold: it has made `step` hops
        k_pos = positions(source, world, seq_len).to(q.device)
        block_out, block_lse = attend(q, k, v, q_pos, k_pos, is_causal, visible)
        out, lse = merge(out, lse, block_out, block_lse)
        if step < world - 1:
            k, v = pass_on(k, group), pass_on(v, group)
    return out, lse


# %% [markdown]
# The ring is built from four small pieces passed in as keywords (`positions`, `visible`,
# `merge`, `pass_on`), with the right ones as defaults, so that each mistake below swaps
# exactly one piece.
#
# `check` calls the function with this rank's q, k, v shards and its keywords, then runs the
# backward with the oracle's dout shard. The adapter options say how: `tensor_layout="bhsd"`
# (the default is `(B, S/W, H, D)`), `causal_keyword="is_causal"` (the default is `causal`); the
# process group goes to `group`, the default. Every check in this chapter runs on one pool of 4
# gloo processes started once (`pool=`), and each draws 8 to 12 cases. A function defined in a
# notebook cell travels to the processes by value (cloudpickle), so a notebook needs no
# `if __name__ == "__main__":` guard. A script does, because the processes import it again.

# %%
pool = launch.Pool(4, timeout=60)
MINE = dict(tensor_layout="bhsd", causal_keyword="is_causal")  # my_ring's conventions
report = check(my_ring, method="ring", dtypes=("float32", "float64"), examples=12, pool=pool,
               **MINE)  # fmt: skip
print(report)

assert report.passed
assert {r.case.world for r in report.results} == {1, 2, 3, 4}
assert {r.case.causal for r in report.results} == {False, True}
assert {r.case.heads_q // r.case.heads_kv for r in report.results} == {1, 2}  # GQA drawn too
worst = {"float32": 0.0, "float64": 0.0}
for result in report.results:
    for verdict in result.verdicts:
        worst[result.case.dtype] = max(worst[result.case.dtype], *verdict.errors.values())
assert worst["float32"] < 1e-6 and worst["float64"] < 1e-15
first = report.results[0].case  # hypothesis tries the simplest case first
assert (first.world, first.seq_len, first.heads_q, first.head_dim) == (1, 2, 1, 4)
print(f"\nlargest error: float32 {worst['float32']:.1e}, float64 {worst['float64']:.1e}")

# %% [markdown]
# One row per case, with the largest error of each tensor over the ranks. Every float32 error
# is below $10^{-6}$ and every float64 error below $10^{-15}$, well inside $10^{-5}$ and
# $10^{-10}$. The first case drawn is the smallest the sweep allows (W=1, S=2, one head,
# D=4): hypothesis starts there, and it is where a mistake that has nothing to do with the
# ring shows up first. The last lines, *information*, are about messages and memory, rank by
# rank, for the widest case of the sweep (the one with the most messages); they come back in a
# section of their own below.
#
# ## Four planted mistakes
#
# Each mistake is a small variant of `my_ring` with one piece swapped. A failing report
# gives the sweep's table, then the **smallest failing case** hypothesis shrank to, then
# sentences that say which tensors are wrong on which ranks, rows and heads, and which mistake
# of a catalogue the wrong tensor matches. The catalogue's candidates are built from the
# oracle's own records: what rank r's out would be with a block left out of the merge, with
# the blocks summed, with another rank's positions, and so on. The report ends with a script
# that reruns that one case.
#
# ### 1. Merging without the LSE weights
#
# The partial outputs of the blocks are added as they come, without the rescale of the online
# softmax:


# %%
def merge_by_adding(out, lse, block_out, block_lse):
    """A mistake: each block's output is normalised by its own sum only, then added."""
    return out + block_out, torch.logaddexp(lse, block_lse)


def ring_without_weights(q, k, v, *, is_causal=False, group=None):
    """my_ring with merge_by_adding."""
    return my_ring(q, k, v, is_causal=is_causal, group=group, merge=merge_by_adding)


without_weights = check(ring_without_weights, method="ring", examples=10, pool=pool, **MINE)
print(without_weights)
assert not without_weights.passed and without_weights.smallest.status == "fail"
assert "merged without the LSE weights" in str(without_weights)
assert "out wrong on every row and head of ranks 0, 1" in str(without_weights)
assert without_weights.smallest.case.world == 2
assert all("out" in v.wrong and "lse" not in v.wrong for v in without_weights.smallest.verdicts)

# %% [markdown]
# The smallest failing case has W=2: with one rank there is one block and nothing to merge, so
# W=1 passes (the first row of the table). The LSE is right, since `logaddexp` is the right
# merge of the LSEs; only out is wrong, on every row of both ranks. The gradients are wrong
# too, but the report does not try to explain them: they start from a wrong forward.
#
# ### 2. A strict causal mask
#
# `<` where `<=` belongs, so each query misses its own key:


# %%
def strict_mask(q_pos, k_pos):
    """A mistake: a query sees only the keys strictly before it."""
    return q_pos[:, None] > k_pos[None, :]


def ring_with_strict_mask(q, k, v, *, is_causal=False, group=None):
    """my_ring with strict_mask."""
    return my_ring(q, k, v, is_causal=is_causal, group=group, visible=strict_mask)


strict_report = check(ring_with_strict_mask, method="ring", examples=10, pool=pool, **MINE)
print(strict_report)
assert not strict_report.passed
assert "the diagonal is masked: each query misses its own key" in str(strict_report)
assert strict_report.smallest.case.world == 1 and strict_report.smallest.case.causal
assert strict_report.smallest.verdicts[0].errors["lse"] == math.inf

# %% [markdown]
# Here the smallest failing case has **W=1**: a single process, no message at all. That is the
# most useful thing the shrinking says: this is not a bug of the distribution. The LSE error is
# infinite because the first query sees no key at all, so its LSE is $-\infty$.
#
# ### 3. The ring run the wrong way
#
# The blocks are sent to rank − 1 instead of rank + 1, while the loop still believes that at
# step t it holds the block of rank $(r - t) \bmod W$, and masks it with that rank's positions:


# %%
def pass_to_previous(x, group):
    """A mistake: the hop goes to rank - 1."""
    return RingPass.apply(x, group, -1)


def ring_the_wrong_way(q, k, v, *, is_causal=False, group=None):
    """my_ring with pass_to_previous."""
    return my_ring(q, k, v, is_causal=is_causal, group=group, pass_on=pass_to_previous)


wrong_way = check(ring_the_wrong_way, method="ring", examples=10, pool=pool, **MINE)
print(wrong_way)
assert not wrong_way.passed
assert "K, V travel the ring the wrong way" in str(wrong_way)
assert "the contribution of rank 1's queries is missing" in str(wrong_way)
assert wrong_way.smallest.case.world == 3 and wrong_way.smallest.case.causal
rank_0, rank_1 = wrong_way.smallest.verdicts[:2]
assert "out" not in rank_0.wrong and {"dk", "dv"} <= set(rank_0.wrong) and "out" in rank_1.wrong
assert wrong_way.smallest.diagnosis[0].startswith("out wrong on every row and head of rank 1")

# %% [markdown]
# The smallest failing case is causal with **W=3**, and both facts are clues. Without a mask
# the order in which blocks arrive does not matter (the LSE merge is commutative), so every
# non-causal case passes; and at W=2, rank + 1 and rank − 1 are the same rank. At W=3 rank 1
# attends to rank 2's keys as if they were rank 0's, and sees all of them; its out is the
# sentence that names the mistake, and the report puts it first: it lists the forward's
# tensors before the gradients, because a wrong forward explains wrong gradients. Rank 0's out
# is right (every block it gets is hidden from it, whoever's it is), but its dK and dV are
# wrong: the gradient rank 1's queries owe to rank 0's keys went to rank 2's keys instead.
#
# ### 4. A gradient that goes the wrong way
#
# The last mistake is in the backward only: the gradient of a hop is sent on in the direction
# the block went, instead of back:


# %%
class RingPassGradientAhead(RingPass):
    """A mistake: the gradient of x goes ``shift`` ranks ahead too, not back."""

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.group, ctx.shift), None, None


def pass_with_gradient_ahead(x, group):
    """The ring's hop, with RingPassGradientAhead's backward."""
    return RingPassGradientAhead.apply(x, group, 1)


def ring_gradient_ahead(q, k, v, *, is_causal=False, group=None):
    """my_ring with pass_with_gradient_ahead."""
    return my_ring(q, k, v, is_causal=is_causal, group=group, pass_on=pass_with_gradient_ahead)


gradient_ahead = check(ring_gradient_ahead, method="ring", examples=10, pool=pool, **MINE)
print(gradient_ahead)
assert not gradient_ahead.passed
assert "no mistake in sptutor's catalogue matches it" in str(gradient_ahead)
smallest = gradient_ahead.smallest
assert smallest.case.world == 3
assert all(sorted(verdict.wrong) == ["dk", "dv"] for verdict in smallest.verdicts)

# %% [markdown]
# This one is not in the catalogue, and the report says so. It still narrows the search a
# long way: out, the LSE and dq are right (they never cross the ring backwards), dK and dV are
# wrong on every rank, and the smallest failing case has W=3, where for the first time "back"
# and "ahead" are different ranks. Forward right, dK and dV wrong, first at W=3: that points at
# the gradient of the hop.
#
# ## Why the shrinking matters
#
# The sweep finds a failure wherever hypothesis happens to draw one: here, for all four
# mistakes, at W=4. The failing case it shrinks to is never larger than those, and
# the size at which a mistake first appears is itself a diagnosis: W=1 says "not
# distributed", W=2 "merging", W=3 "direction". The smallest cases of the four mistakes, beside
# the failing cases the sweep found:

# %%
planted = {
    "merge without weights": without_weights,
    "strict mask": strict_report,
    "ring the wrong way": wrong_way,
    "gradient ahead": gradient_ahead,
}
for what, found in planted.items():
    failing = [r for r in found.results if not r.passed and not r.shrinking]
    assert all(found.smallest.case.seq_len <= r.case.seq_len for r in failing)
    assert all(found.smallest.case.world <= r.case.world for r in failing)
    assert {r.case.world for r in failing} == {4}
    swept = ", ".join(r.case.describe().removeprefix("ring ") for r in failing)
    print(f"{what:>21}: smallest {found.smallest.case.describe().removeprefix('ring ')}\n"
          f"{'':>21}  the sweep's: {swept}")  # fmt: skip

# %% [markdown]
# ## Messages are information
#
# The checker also looks at what your code sends. When the code logs its messages through
# sptutor's ledger (sptutor's own methods do), they are compared with the oracle's one by one.
# Code on plain `torch.distributed` logs nothing, so the checker watches the calls instead
# (`sptutor.capture`): while your function runs, `send`, `isend`, `batch_isend_irecv` and the
# collectives are wrapped, and each tensor a rank sends is counted with its bytes, per phase.
# Those counts are compared with what the method needs.
#
# For `my_ring` the forward matches: K and V make W − 1 hops each. The backward does not.
# sptutor's ring (chapter 2) keeps only its own shards, sends K and V round the ring again,
# and sends dK and dV accumulators with them, $2(W-1) + 2W$ messages per rank. Autograd
# instead keeps every block `my_ring` received, so nothing is sent again: each hop's gradient
# goes back one hop, $2(W-1)$ messages. That is fewer bytes and more memory (O(S) per rank
# rather than O(S/W)), a legitimate trade and not a bug, so by default it is information,
# not a failure. One case at W=4, checked with and without `enforce=("messages",)`:

# %%
case = Case("ring", members=(0, 1, 2, 3), layout="contiguous", causal=True, batch=1,
            seq_len=16, heads_q=2, heads_kv=1, head_dim=8, dtype="float32")  # fmt: skip
informed = check(my_ring, method="ring", cases=[case], pool=pool, **MINE)
enforced = check(my_ring, method="ring", cases=[case], pool=pool, enforce=("messages",), **MINE)
print(informed, "\n")
print(enforced)

W, per_rank, float32_bytes = case.world, case.seq_len // case.world, 4
block = case.batch * case.heads_kv * per_rank * case.head_dim * float32_bytes  # one K or V shard
mine, needed = 2 * (W - 1), 2 * (W - 1) + 2 * W  # backward messages per rank
assert informed.passed and not enforced.passed
for verdict in informed.results[0].verdicts:
    messages, saved = verdict.information
    assert messages == (f"messages: rank {verdict.rank} sends {mine * block} bytes in backward "
                        f"({mine} messages), the method needs {needed * block} ({needed} "
                        "messages)")  # fmt: skip
    kept, oracle_kept = map(int, re.findall(r"\d+", saved))
    shard = per_rank * case.head_dim * float32_bytes  # one head of one shard
    own_shards = (2 * case.heads_q + 2 * case.heads_kv) * shard  # q and out, k and v
    assert oracle_kept == own_shards + case.heads_q * per_rank * float32_bytes  # and the LSE
    assert kept > W * oracle_kept
for verdict in enforced.results[0].verdicts:
    assert verdict.wrong == [] and len(verdict.problems) == 1  # the numbers pass, messages not
print(f"\nbackward: {mine} messages of {block} bytes, the method's {needed}")

# %% [markdown]
# Forward is not mentioned: there the counts and bytes match. Under `enforce=("messages",)`
# the same numbers fail the case on the message count alone. `enforce=("saved",)` does the
# same for the bytes autograd keeps for backward: sptutor's ring keeps q, k, v, out and the
# LSE of its own shard (the oracle's number), `my_ring` more than W times as much. Enforce
# them when your implementation is meant to be a faithful copy of the method; leave them as
# information when it is only meant to compute the same attention.
#
# ## Other conventions
#
# The adapter has a few more options for code that is not shaped like `my_ring`.
#
# **Forward only, and what comes back.** An inference library's prefill has no backward and
# may return something other than an LSE beside out; here its own K/V shards, for a cache.
# `backward=False` checks out (and an LSE, if one is returned) without gradients, and
# `returns="out"` says the second item is not an LSE. Its arguments are positional, which is
# fine: the checker passes `causal=` and `group=` by keyword.


# %%
def ring_prefill(q, k, v, causal, group):
    """Forward only, on (B, H, S/W, D) shards; returns out and a (k, v) cache."""
    with torch.no_grad():
        out, _ = my_ring(q, k, v, is_causal=causal, group=group)
    return out, (k, v)


prefill = check(ring_prefill, method="ring", examples=8, pool=pool, tensor_layout="bhsd",
                backward=False, returns="out")  # fmt: skip
print(prefill)
assert prefill.passed
assert all(r.worst(name) == "-" for r in prefill.results for name in ("lse", "dq", "dk", "dv"))

# %% [markdown]
# **Objects made per group.** Some libraries build an object once per process group (a
# communicator with its neighbours, buffers, streams) and take it instead of the group.
# `setup(ctx)` runs on every process before each case and returns extra keywords; its
# `ctx.group` is the case's group (the first W ranks), `ctx.rank` the rank in it. torch makes
# every process of the launch take part in creating a group, so `setup` runs on the ranks
# outside the case too, with `ctx.rank` None: there it returns nothing. `group_keyword=None`
# stops the checker passing the group itself.


# %%
@dataclasses.dataclass
class RingComm:
    """What a library might build once per group: the group, this rank in it, its size."""

    group: object
    rank: int
    world: int


def ring_on_comm(q, k, v, *, causal, comm):
    """A library's ring that takes its communicator, not the group."""
    return my_ring(q, k, v, is_causal=causal, group=comm.group)


def make_comm(ctx):
    """The checker's setup: a RingComm for the ranks in the case, nothing elsewhere."""
    return None if ctx.rank is None else {"comm": RingComm(ctx.group, ctx.rank, ctx.world)}


on_comm = check(ring_on_comm, method="ring", examples=8, pool=pool, tensor_layout="bhsd",
                group_keyword=None, setup=make_comm)  # fmt: skip
print(on_comm.verdict())
assert on_comm.passed

# %% [markdown]
# **A library that shards its own way.** Code that decides itself which tokens each rank
# holds tells the checker with `positions(rank, world, seq_len)`, the global positions rank
# holds as a `(S/W,)` tensor. The checker then shards the inputs that way and runs the oracle
# on that partition; the case's layout reads `custom`. Here `my_ring` is given a striped
# partition (rank r holds tokens r, r + W, r + 2W, ..., chapter 2), and the checker the same:


# %%
def striped(rank: int, world: int, seq_len: int) -> torch.Tensor:
    """Rank r holds tokens r, r + W, r + 2W, ...: (S/W,)."""
    return torch.arange(rank, seq_len, world)


striped_report = check(my_ring, method="ring", examples=10, pool=pool, positions=striped,
                       kwargs={"positions": striped}, **MINE)  # fmt: skip
print(striped_report.verdict())
assert striped_report.passed
assert {r.case.layout for r in striped_report.results} == {"custom"}
assert any(r.case.causal and r.case.world > 1 for r in striped_report.results)

# %% [markdown]
# `kwargs` are fixed keywords passed to every call (here, `my_ring`'s own `positions`). A
# library that takes the token layout's name instead has `layout_keyword=` and the sweep
# option `layouts=("contiguous", "zigzag", "striped")`. The other sweep options limit what is
# drawn: `causal`, `dtypes`, `batches`, `per_rank`, `heads_kv`, `gqa`, `head_dims`; and two widen
# it, for code that handles them: `uneven=(False, True)` draws S that W does not divide (shards
# of different lengths; `seq_len_keyword=` passes S), `documents=(False, True)` packs documents
# (`cu_seqlens_keyword=` passes their offsets, `cu_seqlens_scope="local"` as a rank's own).
#
# ## From pytest, the command line and torchrun
#
# Installing sptutor gives pytest a fixture, `sp_oracle`, whose `check` takes the same options
# and fails the test with the whole report as its message. Its processes start once per world
# size and serve every test of the session:
#
# ```python
# from my_project.attention import my_ring
#
#
# def test_my_ring_matches_the_oracle(sp_oracle):
#     sp_oracle.check(my_ring, method="ring", tensor_layout="bhsd", causal_keyword="is_causal")
# ```
#
# The same from a shell, for a function importable as `MODULE:FUNCTION` (exit code 0 only if
# every case passes):
#
# ```bash
# sptutor check my_project.attention:my_ring --method ring --tensor-layout bhsd \
#     --causal-keyword is_causal --dtypes float32,float64
# ```
#
# And on GPUs: a script that calls `check` and is started by `torchrun` runs the cases on
# torchrun's ranks instead of starting processes (NCCL and CUDA tensors when there is a GPU),
# every rank drawing the same cases:
#
# ```python
# from sptutor import torchrun
# from sptutor.testing import check
#
# from my_project.attention import my_ring
#
# if __name__ == "__main__":  # torchrun --standalone --nproc_per_node 4 check_my_ring.py
#     report = check(my_ring, method="ring", tensor_layout="bhsd", causal_keyword="is_causal")
#     if torchrun.is_first():
#         print(report)
# ```
#
# ## What the checker claims, what we measured
#
# <div class="admonition note"><p class="admonition-title">What the checker claims, what we
# measured</p>
# <p><b>sptutor.checker</b> (its module docstring): "compares every rank's output, LSE and
# gradients with the oracle's; its report gives a verdict per case, and for the smallest
# failing case says which ranks, tensors, rows and heads are wrong and which common mistake the
# wrong tensor matches". Measured in this chapter: a correct ring passes every case of both
# dtypes with errors far inside the tolerance; of four planted mistakes, three are named by
# the sentence that describes them, and the fourth, which the catalogue lacks, is said to be
# unmatched but placed (dK and dV on every rank, first at W=3). Messages are compared too, as
# information: the capture of plain <code>torch.distributed</code> calls saw the backward of
# autograd's ring send 2(W−1) messages where the method needs 2(W−1) + 2W.</p>
# </div>

# %%
quoted = ("compares every rank's output, LSE and gradients with the oracle's; its report gives a "
          "verdict per case, and for the smallest failing case says which ranks, tensors, rows "
          "and heads are wrong and which common mistake the wrong tensor matches")  # fmt: skip
assert quoted in " ".join(sptutor.checker.__doc__.split())
named = [without_weights, strict_report, wrong_way]
assert all(not r.passed for r in named) and not gradient_ahead.passed
assert report.passed and prefill.passed and on_comm.passed and striped_report.passed
cases_run = sum(len(r.results) for r in (report, *planted.values(), prefill, on_comm,
                                         striped_report, informed, enforced))  # fmt: skip
assert pool.alive  # no case broke the pool: one launch served them all
print(
    f"{len(named)} of {len(planted)} planted mistakes named; {cases_run} cases run in all, "
    "on one pool of 4 processes"
)
pool.close()

# %% [markdown]
# Every option, the tolerance rule and the whole catalogue of mistakes:
# [Check your own code](../checking.md). The API: [sptutor.testing](../api/testing.md) (`check`,
# `Case`, the tolerance rule), [sptutor.checker](../api/checker.md) (the adapter, the sweep, the
# diagnosis), [sptutor.capture](../api/capture.md) (what plain `torch.distributed` code sends)
# and [sptutor.launch](../api/launch.md) (`Pool`).
