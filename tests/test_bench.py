"""``sptutor bench comm|memory|balance|time``: the oracle's bytes equal sptutor.cost exactly, the
papers' counts relate to ours as the table says, causal work balance per layout is what counting
unmasked pairs gives, and each command writes its figures as JSON and a readable PNG."""

import json
from dataclasses import replace
from fractions import Fraction

import pytest
from matplotlib import image

from sptutor import cli, console, cost
from sptutor.bench import balance, comm, common, memory
from sptutor.layout import LAYOUTS, all_positions
from sptutor.methods import METHODS


@pytest.fixture(scope="module")
def comm_rows():
    return comm.rows(quick=True)


def _cost(row: dict, shape: cost.Shape) -> cost.Cost:
    shape = replace(shape, seq_len=row["seq_len"])
    return cost.of(row["method"], shape, row["world"], causal=True, ulysses=row["ulysses"])


def test_every_ranks_bytes_from_the_ledger_equal_the_closed_form(comm_rows):
    """Per rank and phase, the oracle's ledger sends exactly what sptutor.cost says, and the
    table's ``= cost`` column is that equality (every method, W = 2, 4, 8, two S)."""
    assert {(r["method"], r["world"]) for r in comm_rows} == {
        (m, w) for m in METHODS for w in (2, 4, 8)}  # fmt: skip
    for row in comm_rows:
        closed = _cost(row, comm.SHAPE)
        assert row["forward"] == list(closed.forward) and row["backward"] == list(closed.backward)
        assert row["sent"] == row["cost_sent"]


def test_the_rsa_paper_formula_is_our_count_for_float32_multi_head_attention(comm_rows):
    """Li et al.'s 8(N−1)·B·Z·(L/N)·A elements, times 4 bytes, is exactly what each RSA rank
    sends (MHA, float32): forward 2(N−1)·B·Z·(L/N)·A, backward 6(N−1)·B·Z·(L/N)·A."""
    shape = comm.SHAPE
    for row in (r for r in comm_rows if r["method"] == "rsa"):
        world, seq_len = row["world"], row["seq_len"]
        elements = shape.batch * shape.heads_q * (seq_len // world) * shape.head_dim
        assert row["paper"] == row["sent"] == 8 * (world - 1) * elements * 4
        assert max(row["forward"]) == 2 * (world - 1) * elements * 4
        assert max(row["backward"]) == 6 * (world - 1) * elements * 4


def test_the_other_papers_counts_relate_to_ours_as_the_notes_say(comm_rows):
    """ours/paper: ring 3/2 − 1/W, ulysses (W−1)/W, usp within its bound, lasp (all ranks) 1,
    lasp2 W−1; lss has no published count."""
    expected = {
        "ring": lambda w: Fraction(3, 2) - Fraction(1, w),
        "ulysses": lambda w: Fraction(w - 1, w),
        "lasp": lambda w: Fraction(1),
        "lasp2": lambda w: Fraction(w - 1),
    }
    for row in comm_rows:
        ours = row[row["compared"]]
        if row["method"] == "lss":
            assert row["paper"] is None
        elif row["method"] == "usp":
            assert ours <= row["paper"]
        elif row["method"] in expected:
            assert Fraction(ours) / Fraction(row["paper"]) == expected[row["method"]](row["world"])


def test_saved_bytes_equal_the_closed_form_and_split_by_w_where_the_method_splits_all():
    """``saved_bytes`` equals sptutor.cost on every rank; rsa, ring, ulysses and usp keep exactly
    full/W; lss keeps more, more so as W grows (the gathered K and V)."""
    rows = memory.rows(quick=True)
    for row in rows:
        assert row["saved_per_rank"] == list(_cost(row, memory.SHAPE).saved)
        one_process = replace(memory.SHAPE, seq_len=row["seq_len"])
        assert row["full"] == common.measure(row["method"], one_process, 1)["saved"]
        if row["method"] in ("rsa", "ring", "ulysses", "usp"):
            assert row["saved"] * row["world"] == row["full"]
    lss = [r["saved"] / r["ideal"] for r in rows if r["method"] == "lss" and r["seq_len"] == 32]
    assert 1 < lss[0] < lss[1] < lss[2]


def test_causal_work_per_rank_is_the_count_of_unmasked_pairs_it_owns():
    """Ring's useful MACs per rank are proportional to its unmasked (query, key) pairs,
    sum over its positions p of p + 1: so zigzag is exactly 1.000, and at W=8, S=64 contiguous
    is 484/36 (≈13.4) and striped 288/232 (≈1.24)."""
    rows = balance.rows()
    summary = {(r["method"], r["world"], r["layout"]): r["ratio"] for r in balance.ratios(rows)}
    for world in balance.WORLDS:
        for name in LAYOUTS:
            pairs = [
                int(sum(p + 1 for p in pos.tolist()))
                for pos in all_positions(balance.SHAPE.seq_len, world=world, layout=name)
            ]
            macs = [r["macs"] for r in rows
                    if (r["method"], r["world"], r["layout"]) == ("ring", world, name)]  # fmt: skip
            assert all(Fraction(m, p) == Fraction(macs[0], pairs[0]) for m, p in zip(macs, pairs))
        assert summary[("ring", world, "zigzag")] == 1.0
        assert summary[("usp", world, "zigzag")] == 1.0
    assert summary[("ring", 8, "contiguous")] == 484 / 36
    assert summary[("ring", 8, "striped")] == 288 / 232
    for method, world in (("ring", 4), ("ring", 8), ("usp", 4), ("usp", 8)):
        contiguous, striped, zigzag = (
            summary[(method, world, n)] for n in ("contiguous", "striped", "zigzag")
        )
        assert contiguous > striped > zigzag == 1.0


def _read_png(path):
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    return pixels


@pytest.mark.parametrize("what", ["comm", "memory", "balance"])
def test_bench_out_writes_the_printed_figures_as_json_and_a_png(what, tmp_path, capsys):
    """``sptutor bench <what> --quick --out DIR`` exits 0, prints its table and writes
    ``<what>.json`` holding the measured figures and a readable ``<what>.png``."""
    assert cli.main(["bench", what, "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    figures = json.loads((tmp_path / f"{what}.json").read_text())
    _read_png(tmp_path / f"{what}.png")
    module = {"comm": comm, "memory": memory, "balance": balance}[what]
    assert figures["what"] == what and figures["rows"] == module.rows(quick=True)
    if what == "balance":
        assert figures["ratios"] == balance.ratios(figures["rows"])
        assert "1.000" in text and "max/min" in text
    else:
        assert " NO " not in text and "= cost" in text


def test_time_rows_judge_the_goal_at_the_full_shape_only():
    """``timing.rows`` on made-up seconds: the ratio at the largest W against 1.5 (rsa: no
    goal); with ``judged=False`` (the quick shape) no row has a verdict."""
    from sptutor.bench import timing

    reference = {w: dict.fromkeys(cli.METHODS, 1.0) for w in (1, 4)}
    distributed = {1: dict.fromkeys(cli.METHODS, 1.0),
                   4: dict.fromkeys(cli.METHODS, 1.4) | {"lss": 1.6}}  # fmt: skip
    judged = {r["method"]: r["meets"] for r in timing.rows(reference, {1: 1, 4: 2}, distributed)}
    assert judged == dict.fromkeys(cli.METHODS, True) | {"lss": False, "rsa": None}
    quick = timing.rows(reference, {1: 1, 4: 2}, distributed, judged=False)
    assert all(r["meets"] is None and r["judged"] is False for r in quick)


def test_bench_time_quick_prints_ratios_and_goals_and_writes_them(tmp_path, capsys):
    """``sptutor bench time --quick --out DIR`` (real gloo processes) times every method on 1
    and 2 processes and the single-process reference on the same cores (1, then 2 threads capped
    at the cores); writes time.json and time.png. Each ratio is its times' quotient; the goal
    (1.5; rsa none) is shown but not judged at the quick shape; no time is compared with a
    number."""
    from sptutor.bench import timing

    assert cli.main(["bench", "time", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    rows = json.loads((tmp_path / "time.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(cli.METHODS)
    lines = {line.split()[0]: line for line in text.splitlines() if line.split()}
    for row in rows:
        assert set(row["ratio"]) == set(row["seconds"]) == set(row["single"]) == {"1", "2"}
        assert row["threads"] == {"1": 1, "2": min(2, timing.cores())}
        for world, ratio in row["ratio"].items():
            assert ratio > 0 and ratio == row["seconds"][world] / row["single"][world]
        method, line = row["method"], lines[row["method"]]
        if method == "rsa":
            assert row["goal"] is None and row["meets"] is None
            assert timing.NO_GOAL in line and line.split()[-1] == "-"
        else:  # --quick's S=128 is no shape to judge the goal at: the goal shown, no verdict
            assert row["goal"] == timing.GOAL and row["meets"] is None and not row["judged"]
            assert line.split()[-3:] == ["<=", "1.5", "-"]
        assert f"{row['ratio']['2']:.2f}" in line.split()
    header = lines["method"]
    for column in ("1 thread ms", "W=1 ms", "W=2 ms", "W=1 ratio", "W=2 ratio", "goal"):
        assert column in header
    assert header.endswith("W=2 meets")
    assert "min(W, " in text and "within 1.5x at W=4 and S=4096 (without --quick)" in text
    assert "S=128 is too small to judge it" in text and "computed from the W=2" not in text
    _read_png(tmp_path / "time.png")


def test_python_m_sptutor_bench_is_sptutor_bench(capsys):
    """``python -m sptutor.bench <what>``'s entry point hands its arguments to the CLI's
    ``bench``: the same table as ``sptutor bench <what>``."""
    from sptutor.bench.__main__ import bench

    assert cli.main(["bench", "balance"]) == 0
    expected = capsys.readouterr().out
    assert bench(["balance"]) == 0
    assert capsys.readouterr().out == expected and "max/min" in expected


def test_out_is_refused_for_the_timing_benchmarks_that_write_nothing(capsys):
    """``--out`` on kernels or lasp is an error, exit code 2, one line."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "lasp", "--out", "somewhere"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "sptutor bench: error: --out is for comm, memory, balance, packed and time, not lasp\n"
    )


def test_plain_text_off_a_terminal_and_rich_boxes_on_one(monkeypatch, capsys):
    """Off a terminal a table is aligned plain text under a dashed rule and a training step is
    the plain line the logs are grepped for; on one (``console.fancy``) rich draws boxes."""
    console.table([("ring", 1024, "1.000")], ("method", "bytes", "ratio"), title="t")
    assert capsys.readouterr().out == (
        "t\nmethod  bytes  ratio\n------  -----  -----\nring    1,024  1.000\n"
    )
    console.step("lss", 1, 3, 4.12345, 0.5)
    assert (
        capsys.readouterr().out == "lss      step 1/3 [#######-------------] loss 4.1235  0.5 s\n"
    )
    monkeypatch.setattr(console, "fancy", lambda: True)
    console.table([("ring", 1024)], ("method", "bytes"))
    assert "┃ method ┃" in capsys.readouterr().out
    console.step("lss", 2, 3, 4.0, 1.0)
    assert "loss 4.0000" in capsys.readouterr().out


def test_the_figures_docs_pictures_states_are_the_ones_the_benchmarks_compute():
    """docs/pictures.md quotes the balance table of causal ring at S=64, lss's saved/ideal at
    W = 2, 4, 8 and the packed batch's max/min per method; all are recomputed here (to the 3
    decimals printed) so the page cannot drift."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "pictures.md").read_text()
    computed = {(r["layout"], r["world"]): r["ratio"]
                for r in balance.ratios(balance.rows()) if r["method"] == "ring"}  # fmt: skip
    for lay in LAYOUTS:
        quoted = re.search(rf"^\| {lay} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", page, re.M)
        assert quoted, lay
        assert [float(x) for x in quoted.groups()] == [
            round(computed[(lay, w)], 3) for w in balance.WORLDS
        ]
    lss = {r["world"]: r["saved"] / r["ideal"] for r in memory.rows() if r["method"] == "lss"}
    quoted = re.search(r"\(([\d.]+), ([\d.]+), ([\d.]+) at W = 2, 4, 8\)", page)
    assert [float(x) for x in quoted.groups()] == [round(lss[w], 3) for w in (2, 4, 8)]
    from sptutor.bench import packed

    measured = packed.rows()
    header = re.search(r"^\| max/min useful MACs \|(.*)\|$", page, re.M).group(1)
    methods = [m.strip() for m in header.split("|")]
    assert sorted(methods) == sorted(packed.METHODS)
    for label, key in (("7 packed documents", "macs"), ("one document", "macs_one_document")):
        ratios = packed.balance(measured, key)
        quoted = re.search(rf"^\| {label} \|(.*)\|$", page, re.M).group(1)
        assert [float(x) for x in quoted.split("|")] == [round(ratios[m], 3) for m in methods]


def test_packed_documents_change_the_work_and_never_the_bytes(capsys, tmp_path):
    """``sptutor bench packed --quick``: bytes per rank == sptutor.cost == one document's; the
    packed useful work is what the ground truth's mask counts; figures written with --out."""
    from sptutor.bench import packed

    assert cli.main(["bench", "packed", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "packed.json").read_text())["rows"]
    assert all(r["sent"] == r["cost_sent"] == r["sent_one_document"] for r in rows)
    assert (tmp_path / "packed.png").stat().st_size > 0
    ring = [r for r in rows if r["method"] == "ring"]
    # forward + backward useful MACs = (2 + 5)·B·Hq·D per visible pair: pairs inside one document,
    # causal, counted straight from the offsets
    pairs = sum(n * (n + 1) // 2 for n in packed.DOCUMENTS)
    shape = packed.SHAPE
    assert sum(r["macs"] for r in ring) == 7 * shape.batch * shape.heads_q * shape.head_dim * pairs
    assert "7 documents" in capsys.readouterr().out
