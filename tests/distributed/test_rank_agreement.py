"""Ranks that call a method differently all get one ValueError naming what differs, before the
method's first message; the check is cached per signature, unlogged, and can be turned off."""

import os

import torch
import torch.distributed as dist

import sptutor
from sptutor import comm, launch, ledger

WORLD = 4
ODD_RANK = 2  # the rank that calls differently


def _shards(rank, tokens=8, dtype=torch.float64, heads=2):
    """This rank's q, k, v: (1, tokens, heads, 4)."""
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(1, tokens, heads, 4, generator=generator, dtype=dtype) for _ in range(3)]


def _disagreeing_calls(rank):
    """Each call differs on ODD_RANK only, in one argument."""
    odd = rank == ODD_RANK
    q, k, v = _shards(rank)
    decay = torch.full((2,), 0.5 if odd else 0.9, dtype=torch.float64)
    return {
        "causal": lambda: sptutor.ring_attention(q, k, v, causal=odd),
        "layout": lambda: sptutor.lss_attention(q, k, v, layout="striped" if odd else "zigzag"),
        "scale": lambda: sptutor.rsa_attention(q, k, v, scale=0.5 if odd else None),
        "dtype": lambda: sptutor.ring_attention(
            *_shards(rank, dtype=torch.float32 if odd else torch.float64)
        ),
        "tokens": lambda: sptutor.ring_attention(
            *_shards(rank, tokens=7 if odd else 8), seq_len=31
        ),
        "S": lambda: sptutor.ring_attention(*_shards(rank, tokens=7 if odd else 8)),
        "method": lambda: (sptutor.lss_attention if odd else sptutor.ring_attention)(q, k, v),
        "decay": lambda: sptutor.lasp_attention(q, k, v, decay=decay),
        "return_lse": lambda: sptutor.ulysses_attention(*_shards(rank, heads=4), return_lse=odd),
    }


def _count_checks(monkeypatch_target):
    """Count the calls of ``dist.all_gather_object`` (the agreement check's one collective)."""
    calls = []
    original = monkeypatch_target.all_gather_object

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch_target.all_gather_object = counting
    return calls


def _on_rank(rank, world):
    errors = {}
    for what, call in _disagreeing_calls(rank).items():
        try:
            call()
            errors[what] = None
        except ValueError as error:
            errors[what] = str(error)
    pair = comm.new_group([0, 1])  # collective; ranks 2 and 3 are outside it
    q, k, v = _shards(rank)
    try:
        with ledger.record() as in_pair:
            sptutor.ring_attention(q, k, v, group=pair)
        errors["outside"] = None
        errors["pair events"] = [(e.group, e.seq) for e in in_pair.events]
    except ValueError as error:
        errors["outside"] = str(error)
    checks = _count_checks(dist)
    with ledger.record() as led:
        for _ in range(3):  # one signature three times: one check
            sptutor.ring_attention(q, k, v, causal=True, layout="zigzag")
    checked_once, ops = len(checks), {event.op for event in led.events}
    os.environ["SPTUTOR_CHECK_RANKS"] = "0"
    sptutor.ring_attention(q, k, v, causal=True, layout="striped")  # a new signature, unchecked
    return errors, checked_once, ops, len(checks) - checked_once


def test_ranks_that_disagree_all_raise_naming_the_difference():
    """causal, layout, scale, dtype, shard length, S, method, decay, return_lse: every rank raises
    the same sentence with each rank's value; a rank outside the group is told so."""
    results = launch.spawn(_on_rank, WORLD, timeout=120)
    values = ", ".join(f"rank {r}: {{{r}}}" for r in range(WORLD))
    expected = {
        "causal": "ranks disagree on causal in ring (" + values.format(*[False] * 4) + ")",
        "layout": "ranks disagree on layout in lss (rank 0: 'zigzag', rank 1: 'zigzag', "
        "rank 2: 'striped', rank 3: 'zigzag')",
        "scale": "ranks disagree on scale in rsa (rank 0: None, rank 1: None, rank 2: 0.5, "
        "rank 3: None)",
        "dtype": "ranks disagree on dtype in ring (rank 0: 'float64', rank 1: 'float64', "
        "rank 2: 'float32', rank 3: 'float64')",
        "tokens": "ranks hold [8, 8, 7, 8] tokens in ring, but the layout of S=31 over W=4 ranks",
        "S": "ranks disagree on S in ring (rank 0: 32, rank 1: 32, rank 2: 28, rank 3: 32); when "
        "W does not divide S, pass the same seq_len=S (or cu_seqlens) on every rank",
        "method": "ranks disagree on method in ring (rank 0: 'ring', rank 1: 'ring', "
        "rank 2: 'lss', rank 3: 'ring')",
        "decay": "ranks disagree on decay in lasp (rank 0: (0.9, 0.9), rank 1: (0.9, 0.9), "
        "rank 2: (0.5, 0.5), rank 3: (0.9, 0.9))",
        "return_lse": "ranks disagree on return_lse in ulysses",
    }
    expected["causal"] = expected["causal"].replace("rank 2: False", "rank 2: True")
    for rank, (errors, checked_once, ops, unchecked) in enumerate(results):
        for what, message in expected.items():
            assert errors[what] is not None and errors[what].startswith(message), (what, errors)
        outside = errors["outside"]
        if rank in (0, 1):  # the events name their group's global ranks, in this rank's order
            assert outside is None and errors["pair events"] == [((0, 1), 0), ((0, 1), 1)]
        else:
            assert outside.startswith(f"ring: this process (global rank {rank}) is not a member")
        assert checked_once == 1  # cached per (group, signature): the hot path pays nothing
        assert ops == {"send"}  # the check is not a message of the method: never in the ledger
        assert unchecked == 0  # SPTUTOR_CHECK_RANKS=0 turns it off
