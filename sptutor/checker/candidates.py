"""The catalogue of common mistakes a wrong tensor is compared with: what each (rank, tensor)
would hold after the mistake, built from the oracle's records (per-step blocks for ring and
lss) and from the ground truth with a convention changed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from sptutor import blocks, chunks, layout, oracle
from sptutor.checker.cases import Case


def candidates(case, expected, results, local, name) -> Iterator[tuple[torch.Tensor, str]]:
    """(tensor, what it would mean) pairs, most specific first, built lazily."""
    sim, records = expected.sim, expected.sim.ranks
    for other, record in enumerate(records):
        if other != local:
            whose = f"it is rank {case.members[other]}'s {name}"
            if name in ("dk", "dv"):
                yield getattr(record, name), (
                    f"{whose}: the {name} accumulators stopped a hop short of home, or went to "
                    "the wrong rank")  # fmt: skip
            else:
                yield getattr(record, name), (
                    f"{whose} (a shard went to the wrong rank: a wrong peer, a missed hop, or "
                    "another token layout than the case's)")  # fmt: skip
    truth = getattr(records[local], name)
    if name != "lse" and truth.shape[1] == truth.shape[2]:  # S/W == H: the layouts look alike
        yield truth.transpose(1, 2).contiguous().view(truth.shape), (
            "it is the right tensor with its sequence and head axes read the other way round: "
            "is tensor_layout right?")  # fmt: skip
    if name in ("dk", "dv"):
        other = "dv" if name == "dk" else "dk"
        yield getattr(records[local], other), f"it holds {other}: dK and dV are swapped"
        yield records[local].dk + records[local].dv, "it holds dk + dv: the two are summed"
    yield from _step_candidates(case, sim, local, name)
    yield from _convention_candidates(case, expected, local, name)
    mine = results[local][name].double()
    factor = (mine * truth).sum() / (truth * truth).sum().clamp_min(1e-300)
    if abs(factor.item() - 1) > 1e-3 and abs(factor.item()) > 1e-2:
        yield factor * truth, (f"it is {factor.item():.4g} times the right value (a scale "
                               "factor: e.g. averaged over ranks instead of summed)")  # fmt: skip


def _step_candidates(case, sim, local, name) -> Iterator[tuple[torch.Tensor, str]]:
    """Mistakes about steps, from the oracle's per-block records (ring and lss)."""
    if case.method not in ("ring", "lss") or not sim.steps:
        return
    rank = case.members[local]
    if name in ("out", "lse"):
        made = {s.block: s.tensors for s in sim.steps if s.rank == rank and s.phase == "forward"}
        order = list(made)
        index = 0 if name == "out" else 1
        subsets = [([rank], "only this rank's own block: the blocks it received are not merged")]
        last = "only the last block it received: each step overwrites the result instead of "
        subsets.append(([order[-1]], last + "merging it (the LSE rescale is missing)"))
        for left_out in order:
            whose = f"the block of rank {left_out}"
            if left_out == rank:
                whose = "this rank's own block (the diagonal one)"
            others = [b for b in order if b != left_out]
            subsets.append((others, f"{whose} is missing from the merge"))
        for chosen, meaning in subsets:
            if not chosen:  # nothing merged: out 0, lse -inf
                record = sim.ranks[local]
                yield (torch.zeros_like(record.out) if name == "out" else
                       torch.full_like(record.lse, float("-inf"))), meaning  # fmt: skip
            elif all(b in made for b in chosen):
                yield _merge([made[b] for b in chosen])[index], meaning
        if name == "out" and len(order) > 1:
            summed = sum(made[b]["out"] for b in order)
            yield summed, "the sum of the blocks' outputs: merged without the LSE weights"
            yield summed / len(order), "the mean of the blocks' outputs, not their LSE merge"
        if name == "lse":
            yield torch.zeros_like(sim.ranks[local].lse), "the LSE is zero: never computed"
            yield torch.stack([made[b]["lse"] for b in order]).amax(0), (
                "the largest block LSE, not the log-sum-exp of all blocks")  # fmt: skip
        return
    made = [s for s in sim.steps if s.phase == "backward"]
    if name == "dq":
        mine = {s.block: s.tensors["dq"] for s in made if s.rank == rank}
        parts = [(b, mine[b]) for b in mine]
    else:
        parts = [(s.rank, s.tensors[name]) for s in made if s.block == rank]
    if len(parts) < 2:
        return
    total = sum(part for _, part in parts)
    whose = "the block of rank {}" if name == "dq" else "rank {}'s queries"
    for source, part in parts:
        yield total - part, f"the contribution of {whose.format(source)} is missing"
    own = [part for source, part in parts if source == rank]
    if own:
        yield own[0], (f"only this rank's own contribution: the {name} accumulators that "
                       "travelled never came home, or were never added")  # fmt: skip


def _merge(parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE merge of block results, as the oracle merges them."""
    out, lse = torch.zeros_like(parts[0]["out"]), torch.full_like(parts[0]["lse"], -torch.inf)
    for part in parts:
        out, lse = blocks.merge(out, lse, part["out"], part["lse"])
    return out, lse


def _convention_candidates(case, expected, local, name) -> Iterator[tuple[torch.Tensor, str]]:
    """Whole-sequence mistakes (the causal flag, the diagonal, the softmax scale, the decay),
    for outputs and gradients alike; a ring run the wrong way round; a rank's chunk alone."""
    pos = expected.owned[local]
    dim = 2 if name == "lse" else 1
    for meaning, full in _variants(case, expected.sim.dq is not None):
        if full.get(name) is not None:
            yield full[name].index_select(dim, pos), meaning
    if case.method == "ring" and name in ("out", "lse"):
        yield _ring_mismatched(case, expected, local, 1, -1)[name], (
            "K, V travel the ring the wrong way (sent to rank - 1, received from rank + 1), so "
            "each block is masked with another rank's positions")  # fmt: skip
        yield _ring_mismatched(case, expected, local, -1, 1)[name], (
            "each block held is masked as the block of rank + step, not rank - step (the "
            "source of a step computed the wrong way round)")  # fmt: skip
    blockwise = case.method in ("ring", "rsa", "lss", "usp") and name in ("out", "lse")
    if case.cu_seqlens is not None and blockwise:
        yield (
            _documents_by_local_index(case, expected, local)[name],
            (
                "each token's document is looked up by its index in the rank's shard (0, 1, ...), "
                "not by its global position: cu_seqlens are offsets over the whole sequence"
            ),
        )
    if case.cu_seqlens is not None:  # the chain mistakes below assume one document
        return
    linear_chain = case.method in ("lasp", "lasp2") and case.decay is not None
    if linear_chain and name == "out" and local > 1:
        yield _lasp_carried_without_decay(case, expected, local), (
            "the state is carried from rank to rank without its decay (the decay^C of each hop "
            "is missing)")  # fmt: skip
    if case.is_linear:
        q, k, v, dout = (x.index_select(1, pos) for x in case.inputs(torch.float64))
        alone = _with_grads(oracle.full_linear_attention, (q, k, v), dout,
                            case.causal, case.decay_tensor(torch.float64))  # fmt: skip
        if alone.get(name) is not None:
            yield (
                alone[name],
                "only this rank's own chunk: the state from earlier ranks is not added",
            )


_IGNORED = (
    "the documents are ignored: queries see keys of other documents packed into the "
    "sequence (do the cu_seqlens reach your function, global or local as it expects?)"
)


@functools.lru_cache(maxsize=8)
def _variants(case: Case, backward: bool) -> list[tuple[str, dict]]:
    """Full-sequence results (and gradients) of the usual convention mistakes."""
    q, k, v, dout = case.inputs(torch.float64)
    dout = dout if backward else None
    documents = {"cu_seqlens": case.cu_seqlens_tensor()}
    if case.is_linear:  # (meaning, positional arguments, documents)
        decay, found = case.decay_tensor(torch.float64), []
        if decay is not None:
            found.append(("the decay is not applied", (True, None), documents))
            found.append(("the decay factor was taken for a slope", (True, torch.exp(-decay)),
                          documents))  # fmt: skip
        else:
            found.append(("the causal flag is flipped: does it reach your function?",
                          (not case.causal, None), documents))  # fmt: skip
        if case.cu_seqlens is not None:
            found.append((_IGNORED, (case.causal, decay), {}))
        return [(meaning, _with_grads(oracle.full_linear_attention, (q, k, v), dout, *args,
                                      **docs)) for meaning, args, docs in found]  # fmt: skip
    kind = "non-causal" if case.causal else "causal"
    found = [(f"it is the {kind} result: does the causal flag reach your function?",
              dict(causal=not case.causal, **documents))]  # fmt: skip
    if case.cu_seqlens is not None:
        found.append((_IGNORED, dict(causal=case.causal)))
    elif case.causal:  # (a shifted key position would move keys across document boundaries)
        positions = torch.arange(case.seq_len)
        found.append(("the diagonal is masked: each query misses its own key (a strict < mask)",
                      dict(causal=True, q_pos=positions, k_pos=positions + 1)))  # fmt: skip
    found.append(("the scores are not scaled by 1/sqrt(D)",
                  dict(causal=case.causal, scale=1.0, **documents)))  # fmt: skip
    return [(meaning, _with_grads(oracle.full_attention, (q, k, v), dout, **options))
            for meaning, options in found]  # fmt: skip


def _with_grads(attention, inputs, dout, *args, **options) -> dict:
    """out (and lse) of ``attention`` on leaf copies of ``inputs``, and dq, dk, dv for dout."""
    q, k, v = (x.detach().clone().requires_grad_(dout is not None) for x in inputs)
    result = attention(q, k, v, *args, **options)
    out, lse = result if isinstance(result, tuple) else (result, None)
    found = {"out": out.detach(), "lse": None if lse is None else lse.detach()}
    if dout is not None:
        found |= dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout)))
    return found


def _ring_mismatched(case, expected, local, data_sign, mask_sign) -> dict:
    """Rank ``local``'s out and lse if at each step it held the block of rank + data_sign·step
    but masked it as the block of rank + mask_sign·step (the ring's peers mixed up)."""
    world, positions, docs = case.world, expected.owned, expected.sim.documents
    held = []
    for step in range(world):
        data, masked_as = (local + data_sign * step) % world, (local + mask_sign * step) % world
        if len(positions[data]) == len(positions[masked_as]):  # else sizes cannot be mixed up
            held.append((data, positions[masked_as], docs[local], docs[masked_as]))
    return _attended(case, expected, local, held)


def _documents_by_local_index(case, expected, local) -> dict:
    """Rank ``local``'s out and lse if every rank took its tokens' documents from their local
    indices 0..S_r-1 (``cu_seqlens`` searched with them) instead of their global positions,
    for its queries and for every block of keys alike; the causal mask still by position."""
    offsets, positions = case.cu_seqlens_tensor(), expected.owned
    docs = [layout.document_ids(offsets, torch.arange(len(p))) for p in positions]
    held = [(src, positions[src], docs[local], docs[src]) for src in range(case.world)]
    return _attended(case, expected, local, held)


def _attended(case, expected, local, held: list[tuple]) -> dict:
    """Rank ``local``'s out and lse, LSE-merged over the blocks ``held``: each ``(src, k_pos,
    q_doc, k_doc)``, rank src's K, V masked as keys at k_pos, with those document ids."""
    q, k, v = (layout.shard_by(x, expected.owned) for x in case.inputs(torch.float64)[:3])
    scale = case.head_dim**-0.5
    parts = [dict(zip(("out", "lse"), blocks.attention_block(
        q[local], k[src], v[src], expected.owned[local], k_pos, case.causal, scale, q_doc,
        k_doc))) for src, k_pos, q_doc, k_doc in held]  # fmt: skip
    out, lse = _merge(parts)
    return {"out": out, "lse": lse}


def _lasp_carried_without_decay(case, expected, local) -> torch.Tensor:
    """Rank ``local``'s LASP output if each rank passed ``state + local`` on, not
    ``decay^C · state + local``: its chunk's own part plus what it reads of that state."""
    q, k, v = (layout.shard_by(x, expected.owned) for x in case.inputs(torch.float64)[:3])
    decay = case.decay_tensor(torch.float64)
    state = sum(chunks.local_state(k[t], v[t], decay, heads_q=case.heads_q) for t in range(local))
    own = chunks.intra(q[local], k[local], v[local], decay)
    return own + chunks.readout(q[local], state, decay)
