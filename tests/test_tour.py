"""The tour prints claims; these tests hold every printed row to them."""

from sptutor import oracle, tour

FLOAT64 = 1e-12  # float64, the same math reordered: observed ~1e-16 (see tests/test_blocks.py)


def test_merged_blocks_equal_full_attention_in_every_row():
    """Section 1: every layout x W x causal merge agrees with full attention to float64 rounding."""
    rows = tour.merge_rows()
    assert len(rows) == 3 * 3 * 2
    assert all(row["out err"] <= FLOAT64 and row["lse err"] <= FLOAT64 for row in rows)


def test_every_oracle_row_is_exact_and_equals_its_formula():
    """Section 2: each oracle is exact, its ledger equals sptutor.cost, zigzag balances work."""
    rows = tour.oracle_rows()
    assert {row["method"].split()[0] for row in rows} == set(oracle.METHODS)
    for row in rows:
        errors = [row["out err"], row["grad err"]] + (
            [] if row["lse err"] == "-" else [row["lse err"]]
        )
        assert max(errors) <= FLOAT64, row
        assert row["= formula"] is True, row
        if row["layout"] == "zigzag" and row["causal"]:
            assert row["work max/min"] == "1.00", row


def test_every_real_row_matches_its_oracle():
    """Section 3: real code on 4 processes equals its oracle, ledger and saved bytes included."""
    rows = tour.real_rows()
    assert {row["method"].split()[0] for row in rows} == set(oracle.METHODS)
    for row in rows:
        errors = [row["out err"], row["grad err"]] + (
            [] if row["lse err"] == "-" else [row["lse err"]]
        )
        assert max(errors) <= 1e-10, row
        assert row["ledger"] == "match" and row["= oracle"] is True, row
