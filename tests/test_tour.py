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


def test_the_realistic_size_table_tells_each_papers_memory_story():
    """Section 4: LASP's traffic does not grow with S; RSA keeps S²/W, ring O(S/W), LSS O(S)."""
    rows = {(row["method"].split()[0], row["S"], row["W"]): row for row in tour.cost_rows()}

    def mib(method, seq_len, world, column):
        return float(rows[method, seq_len, world][column])

    assert mib("lasp", 32768, 8, "sent MiB/rank") == mib("lasp", 131072, 8, "sent MiB/rank")
    assert mib("rsa", 131072, 8, "saved MiB/rank") > 15 * mib("rsa", 32768, 8, "saved MiB/rank")
    assert mib("ring", 131072, 8, "saved MiB/rank") == 4 * mib("ring", 32768, 8, "saved MiB/rank")
    assert mib("ring", 32768, 4, "saved MiB/rank") == 2 * mib("ring", 32768, 8, "saved MiB/rank")
    assert mib("lss", 32768, 8, "saved MiB/rank") > mib("ring", 32768, 4, "saved MiB/rank")


def test_the_docs_print_the_tours_realistic_size_table():
    """docs/methods.md's table is section 4 of the tour, not numbers typed by hand."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    printed = {
        f"| {r['method']} | {r['S']} | {r['W']} | {r['sent MiB/rank']} | {r['saved MiB/rank']} |"
        for r in tour.cost_rows()
    }
    documented = {line for line in page.splitlines() if line.startswith("| ") and "MiB" not in line}
    documented = {line for line in documented if line.split("|")[2].strip().isdigit()}
    assert documented and documented <= printed
