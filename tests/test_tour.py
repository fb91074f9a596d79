"""The tour prints claims; these tests hold every printed row to them, and the text around the
tables to what a newcomer needs: an introduction, a legend for every column, where to go next."""

import contextlib
import io
import re

import pytest

from sptutor import console, layout, oracle, tour

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


# Section 4 worked by hand from the papers' formulas, for B=1, Hq=32, Hkv=8, D=128, bfloat16.
# At S=32768, W=8 a rank holds 4096 tokens: a K or V shard is 4096·8·128·2 B = 8 MiB (16 MiB as a
# float32 gradient accumulator), a Q or O shard 4096·32·128·2 B = 32 MiB, an LSE 32·4096·4 B =
# 0.5 MiB. "sent" is forward + backward per rank, "saved" what a rank keeps for backward, in MiB.
HAND_WORKED = {
    # RSA (§3.2: 8(N-1)·B·Z·(L/N)·A, Z = Hkv here): rings of K and V, 2·7·8 forward and again
    # backward, plus all-reduces of dK and dV over all S tokens in float32, 2·(7/8)·128 each:
    # 112 + 112 + 448; it keeps Q, K, V and P, 32·4096·32768·2 B = 8192 MiB
    ("rsa", 32768, 8): ("672.0", "8240.0"),
    # ring: K, V blocks 7 hops each way (2·7·8 twice), dK, dV accumulators 8 hops in float32
    # (2·8·16); keeps Q, O, K, V and the LSE: 32 + 32 + 8 + 8 + 0.5
    ("ring", 32768, 8): ("480.0", "80.5"),
    # Ulysses: all-to-alls put 7/8 of Q, K, V, O (28 + 7 + 7 + 28) on the wire each way; keeps
    # Q, K, V, O, LSE on 4 heads of all S tokens: the same bytes as ring
    ("ulysses", 32768, 8): ("140.0", "80.5"),
    # USP U=4 x R=2: all-to-alls of 3/4 (24 + 6 + 6 + 24 each way), and a 2-rank ring over 16384
    # tokens x 2 K/V heads (8 MiB blocks): 16 forward, 16 + 2·2·16 backward
    ("usp u=4", 32768, 8): ("216.0", "80.5"),
    # LSS: an all-gather of [K‖V] (2·8·7), a reduce-scatter of [dK‖dV] in float32 (2·16·7); keeps
    # Q, O, LSE and the K, V of all 32768 tokens, 2·32768·8·128·2 B = 128 MiB
    ("lss", 32768, 8): ("336.0", "192.5"),
    # LASP: one float32 state B·Hq·D², 32·128²·4 B = 2 MiB, each way; keeps Q, K, V and a state
    ("lasp", 32768, 8): ("4.0", "50.0"),
    # LASP-2: every rank puts its 2 MiB state on the wire for 7 others, each way
    ("lasp2", 32768, 8): ("28.0", "50.0"),
    # 4x the sequence: LASP sends the same; RSA's P grows 16x (to 131072 MiB; Q, K, V 4x to 192);
    # ring's bytes grow 4x
    ("lasp", 131072, 8): ("4.0", "194.0"),
    ("rsa", 131072, 8): ("2688.0", "131264.0"),
    ("ring", 131072, 8): ("1920.0", "322.0"),
    # half the ranks (8192 tokens each): ring 2·3·16 + 2·3·16 + 2·4·32 and twice the shards; LSS
    # 2·16·3 + 2·32·3, the same 128 MiB of K, V plus shards twice as large (64 + 64 + 1)
    ("ring", 32768, 4): ("448.0", "161.0"),
    ("lss", 32768, 4): ("288.0", "257.0"),
}


def test_the_realistic_size_table_equals_the_papers_formulas_worked_by_hand():
    """Section 4 prints the MiB worked by hand from the papers' formulas (HAND_WORKED)."""
    printed = {
        (row["method"], row["S"], row["W"]): (row["sent MiB/rank"], row["saved MiB/rank"])
        for row in tour.cost_rows()
    }
    for key, expected in HAND_WORKED.items():
        assert printed[key] == expected, key


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


# what the closing must name: the docs site and its first pages, two commands, the oracle API
NEXT_STEPS = (
    *("mkdocs serve", "Concepts", "Design", "Oracle and real code side by side"),
    *("sptutor train --method ring --world 4", "sptutor train --help", "sptutor trace METHOD"),
    "sptutor bench comm | memory | balance | time",
    *("sptutor.testing", "Check your own implementation"),
)


@pytest.fixture(scope="module")
def printed() -> str:
    """What ``sptutor tour`` prints (``tour.run()``), run once for every test of the text: a run
    launches 4 processes, seconds on two cores. capsys is per test, so stdout is redirected here."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        tour.run()
    return buffer.getvalue()


def _section(text: str, number: int) -> list[str]:
    """The lines of section ``number``, from its title to the next title or the closing."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{number}. "))
    ends = (i for i in range(start + 1, len(lines)) if re.match(r"\d\. |Where to go", lines[i]))
    return lines[start : next(ends, len(lines))]


def _rule(section: list[str]) -> int:
    """Index of the dashed rule under a table's header."""
    return next(i for i, line in enumerate(section) if line and set(line) <= {"-", " "})


def _table(section: list[str]) -> tuple[list[str], list[dict], list[str]]:
    """(column names, rows as dicts, lines below) of the table found by its dashed rule; each
    column spans its run of dashes, so a name may hold spaces ("= formula")."""
    rule = _rule(section)
    spans = [match.span() for match in re.finditer(r"-+", section[rule])]
    columns = [section[rule - 1][a:b].strip() for a, b in spans]
    end = section.index("", rule)
    rows = [
        {name: line[a:b].strip() for name, (a, b) in zip(columns, spans)}
        for line in section[rule + 1 : end]
    ]
    return columns, rows, section[end + 1 :]


def test_the_tour_opens_by_saying_what_sptutor_is_and_how_long_it_takes(printed):
    """The opening paragraph names the oracle, the real code, what is measured and the time."""
    opening = printed.split("\n1. ")[0]
    for words in ("sequence parallelism", "oracle", "torch.distributed", "bytes", "seconds"):
        assert words in opening, words


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_every_section_opens_with_two_lines_of_what_it_shows(number, printed):
    """Each section's title is followed by two indented lines of prose, then a blank line."""
    section = _section(printed, number)
    assert all(line.startswith("   ") and len(line) > 40 for line in section[1:3]), section[:4]
    assert section[3] == "", section[:4]


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_every_column_is_explained_in_the_legend_below_its_table(number, printed):
    """Each column header appears among the names of a "names: meaning" legend entry."""
    columns, rows, below = _table(_section(printed, number))
    entries = [line for line in below if re.match(r"   \S", line)]
    explained = {name for line in entries for name in line.split(": ")[0].strip().split(", ")}
    assert rows and set(columns) <= explained, set(columns) - explained


def test_the_tour_fits_100_columns(printed):
    """No printed line is wider than 100 characters."""
    assert max(len(line) for line in printed.splitlines()) <= 100


def test_section_3_says_it_is_starting_processes_before_the_wait(printed):
    """The launch is announced before the table, and its end reported."""
    section = _section(printed, 3)
    starting = next(i for i, line in enumerate(section) if "starting 4 gloo processes" in line)
    done = next(i for i, line in enumerate(section) if line.strip().startswith("done in"))
    assert 3 < starting < done < _rule(section)


def test_the_printed_tables_keep_the_facts_the_rows_are_tested_for(printed):
    """Folding rows into shorter tables keeps every method, exactness, the formulas, the ledgers,
    and the balance: zigzag 1.00 where contiguous is 6.33 for a causal ring."""
    merged = _table(_section(printed, 1))[1]
    assert [row["layout"] for row in merged] == list(layout.LAYOUTS)
    assert all(float(row["out err"]) <= FLOAT64 for row in merged)
    rows = _table(_section(printed, 2))[1]
    assert {row["method"].split()[0] for row in rows} == set(oracle.METHODS)
    assert all(float(row["err"]) <= FLOAT64 and row["= formula"] == "yes" for row in rows)
    ring = next(row for row in rows if row["method"] == "ring" and row["causal"] == "yes")
    assert (ring["contiguous"], ring["zigzag"]) == ("6.33", "1.00")
    assert all(row["zigzag"] in ("1.00", "-") for row in rows)
    real = _table(_section(printed, 3))[1]
    assert {row["method"].split()[0] for row in real} == set(oracle.METHODS)
    assert all(row["ledger"] == "match" and row["= oracle"] == "yes" for row in real)
    costs = _table(_section(printed, 4))[1]
    assert costs == [{k: console.cell(v) for k, v in row.items()} for row in tour.cost_rows()]


def test_the_closing_says_where_to_go_next(printed):
    """The tour ends by naming the docs, the train and bench commands and the oracle API."""
    closing = printed.split("Where to go next")[1]
    for words in NEXT_STEPS:
        assert words in closing, words
