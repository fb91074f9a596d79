"""What the pictures read from a ledger besides the compared key: the group of each event, each
rank's own order of events, the block a compute event worked on, and the call on the simulation."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import oracle
from sptutor.ledger import CommEvent, Ledger
from tests.strategies import attention_inputs


def test_seq_numbers_each_ranks_events_in_its_own_order_and_stay_out_of_equality():
    """Ledger.log numbers events 0, 1, 2, ... per rank; seq, group and block are not compared."""
    led = Ledger()
    for rank in (0, 1, 0, 0, 1):
        led.log(CommEvent("send", rank, 1 - rank, 8, "forward", group=(0, 1)))
    assert [(e.rank, e.seq) for e in led.events] == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1)]
    assert led.events[0] == CommEvent("send", 0, 1, 8, "forward")  # metadata aside: equal
    assert led.events[0].key() == ("send", 0, 1, 8, "forward", 0)


@given(st.integers(2, 6), st.sampled_from(["contiguous", "zigzag", "striped"]), st.booleans())
def test_ring_compute_events_name_the_block_each_rank_holds_at_each_step(world, layout, causal):
    """Ring: at step s rank r computes on rank (r - s) % W's block; every event names the whole
    group; the simulation records the call."""
    q, k, v, dout = attention_inputs(0, 1, 4 * world, 2, 1, 4)
    sim = oracle.simulate("ring", q, k, v, dout, world=world, causal=causal, layout=layout)
    for event in sim.ledger.events:
        assert event.group == tuple(range(world))
        if event.op == "compute":
            assert event.block == (event.rank - event.step) % world
    assert (sim.method, sim.world, sim.layout, sim.causal, sim.ulysses) == (
        "ring", world, layout, causal, 1)  # fmt: skip
    assert sim.shape == (1, 4 * world, 2, 1, 4) and len(sim.positions) == world


def test_usp_events_tell_the_concurrent_ulysses_groups_apart():
    """USP U=2 × R=2: the all-to-alls happen in the two Ulysses rows {0, 1} and {2, 3}, the ring
    sends in the columns {0, 2} and {1, 3}."""
    q, k, v, dout = attention_inputs(1, 1, 16, 4, 2, 4)
    sim = oracle.simulate("usp", q, k, v, dout, world=4, causal=True, layout="zigzag", ulysses=2)
    groups = {(e.op, e.group) for e in sim.ledger.messages()}
    assert {g for op, g in groups if op == "all_to_all"} == {(0, 1), (2, 3)}
    assert {g for op, g in groups if op == "send"} == {(0, 2), (1, 3)}
    assert sim.ulysses == 2 and isinstance(sim.positions[0], torch.Tensor)
