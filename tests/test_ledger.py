"""The ledger (Design, *The ledger*): wire bytes per op, and recordings that nest and isolate."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sptutor import ledger
from sptutor.ledger import CommEvent


@given(st.integers(0, 10**5), st.integers(1, 16))
def test_collectives_cost_what_their_sends_would(chunk_bytes, world):
    """Each collective costs what the point-to-point sends it stands for would cost."""
    # an all-gather sends its chunk to W-1 ranks and a reduce-scatter mirrors it; an all-to-all
    # sends W-1 of its W chunks; an all-reduce is a reduce-scatter then an all-gather (the ring
    # algorithm); a group of one sends nothing
    c, w = chunk_bytes, world
    send = ledger.wire_bytes("send", c, w)
    assert ledger.wire_bytes("all_gather", c, w) == (w - 1) * send
    assert ledger.wire_bytes("reduce_scatter", c, w) == ledger.wire_bytes("all_gather", c, w)
    assert ledger.wire_bytes("all_to_all", w * c, w) == (w - 1) * send
    assert ledger.wire_bytes("all_reduce", w * c, w) == (
        ledger.wire_bytes("reduce_scatter", c, w) + ledger.wire_bytes("all_gather", c, w)
    )
    for op in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
        assert ledger.wire_bytes(op, c, 1) == 0


def test_wire_bytes_worked_example():
    """A 1 KiB tensor on 4 ranks: all-to-all keeps a quarter home, all-reduce moves 1.5x."""
    assert ledger.wire_bytes("all_to_all", 1024, 4) == 768
    assert ledger.wire_bytes("all_reduce", 1024, 4) == 1536
    assert ledger.wire_bytes("all_gather", 1024, 4) == 3072
    assert ledger.wire_bytes("send", 1024, 1) == 1024
    assert ledger.wire_bytes("all_reduce", 1024, 1) == 0
    assert ledger.wire_bytes("all_to_all", 10, 3) == 6  # 2/3 of 10 bytes, rounded down


def test_wire_bytes_rejects_unknown_ops_and_sizes():
    """Unknown ops, worlds below 1 and negative sizes are ValueErrors."""
    with pytest.raises(ValueError, match="'broadcast'"):
        ledger.wire_bytes("broadcast", 8, 2)
    with pytest.raises(ValueError, match="world=0"):
        ledger.wire_bytes("send", 8, 0)


def _send(rank, nbytes, phase="forward"):
    return CommEvent("send", rank, (rank + 1) % 4, nbytes, phase, 0)


def test_record_nests_and_isolates():
    """An event reaches every open recording; nothing is caught outside or after one."""
    ledger.log(_send(0, 1))  # no recording open: dropped
    with ledger.record() as outer:
        ledger.log(_send(0, 10))
        with ledger.record() as inner:
            ledger.log(_send(1, 100))
        with ledger.record() as sibling:
            ledger.log(_send(2, 1000))
        ledger.log(_send(3, 10000))
    ledger.log(_send(0, 5))
    assert [e.nbytes for e in outer.events] == [10, 100, 1000, 10000]
    assert [e.nbytes for e in inner.events] == [100]
    assert [e.nbytes for e in sibling.events] == [1000]


def test_record_closes_on_error():
    """A recording that raised is closed: later events do not reach it."""
    with pytest.raises(RuntimeError), ledger.record() as led:
        raise RuntimeError("boom")
    ledger.log(_send(0, 7))
    assert led.events == []


def test_totals_and_summary():
    """bytes_sent sums messages (by rank, by phase) and ignores compute; macs sums compute."""
    led = ledger.Ledger()
    led.log(_send(0, 10))
    led.log(_send(1, 20, "backward"))
    led.log(CommEvent("compute", 0, None, 0, "forward", 0, macs=64))
    assert led.bytes_sent() == 30
    assert led.bytes_sent(rank=1) == 20
    assert led.bytes_sent(phase="forward") == 10
    assert led.macs(rank=0) == 64
    assert len(led.messages()) == 2
    assert "bytes sent" in led.summary() and "64" in led.summary()


def test_events_validate_op_and_phase():
    """A CommEvent with an unknown op or phase is a ValueError."""
    with pytest.raises(ValueError, match="op must be one of"):
        CommEvent("gossip", 0, None, 1, "forward")
    with pytest.raises(ValueError, match="phase must be one of"):
        CommEvent("send", 0, 1, 1, "sideways")
