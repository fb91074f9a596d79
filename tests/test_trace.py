"""``sptutor trace``: its table is the oracle's ledger event by event, it draws a valid PNG or SVG
for every method, and bad arguments are refused up front with the library's sentence. With packed
documents (``--cu-seqlens``) and uneven shards it shows each rank's documents and exactly the K/V
blocks that have no visible pair."""

import bisect
import xml.etree.ElementTree as ElementTree

import pytest
import torch
from matplotlib import image

from sptutor import chain, checks, cli, layout, oracle, trace
from sptutor.ledger import PHASES
from sptutor.mesh import check_mesh_sizes
from sptutor.methods import METHODS


def test_schedule_rows_are_each_ranks_ledger_events_in_its_own_order():
    """Each row of the printed schedule lists exactly that rank's events of the phase, in seq
    order, with the bytes each message puts on the wire and the MACs of each compute."""
    sim = trace.simulate(trace.TraceConfig("usp", causal=True, layout="zigzag"))
    for phase in PHASES:
        for rank, cells in enumerate(trace.schedule_rows(sim, phase)):
            events = sorted((e for e in sim.ledger.events if e.rank == rank and e.phase == phase),
                            key=lambda e: e.seq)  # fmt: skip
            assert len(cells) == len(events) > 0
            for text, event in zip(cells, events):
                amount = f"{event.macs:,} MACs" if event.op == "compute" else f"{event.nbytes:,} B"
                assert text.startswith(event.op) and text.endswith(amount)
                if event.op == "send":
                    assert f"→ {event.peer}" in text


def test_the_defaults_trace_the_small_call_the_brief_names():
    """Defaults: W=4, S=16, Hq=4, Hkv=2, D=8, float64, contiguous, not causal; usp U=2."""
    sim = trace.simulate(trace.TraceConfig("usp"))
    assert (sim.world, sim.shape, sim.ulysses, sim.layout, sim.causal) == (
        4, (1, 16, 4, 2, 8), 2, "contiguous", False)  # fmt: skip
    assert sim.out.dtype == torch.float64 and sim.dq is not None
    assert trace.simulate(trace.TraceConfig("ring", forward_only=True)).dq is None


@pytest.mark.parametrize("method", METHODS)
def test_trace_prints_every_ranks_schedule_and_totals(method, capsys):
    """``sptutor trace METHOD --causal`` exits 0 and prints the title, forward and backward tables
    (a few events each, at most 100 columns wide) with a row per rank, and each rank's bytes sent
    as the ledger counts them."""
    assert cli.main(["trace", method, "--causal"]) == 0
    text = capsys.readouterr().out
    sim = trace.simulate(trace.TraceConfig(method, causal=True))
    assert text.startswith(trace.title(sim))
    assert "forward, events 1-" in text and "backward, events 1-" in text
    assert all(len(line) <= 100 for line in text.splitlines())  # fits a terminal, in chunks
    totals = text.split("per rank\n")[1].splitlines()[2:6]
    for rank, line in enumerate(totals):
        sent = [sim.ledger.bytes_sent(rank, phase) for phase in PHASES]
        assert line.split()[0] == str(rank) and line.split()[2:4] == [f"{b:,}" for b in sent]


def test_forward_only_prints_no_backward(capsys):
    """``--forward-only``: the forward's events only."""
    assert cli.main(["trace", "lss", "--forward-only"]) == 0
    text = capsys.readouterr().out
    assert "forward, events 1-" in text and "backward, events" not in text


@pytest.mark.parametrize("method", METHODS)
def test_trace_out_writes_a_valid_png_and_svg(method, tmp_path, capsys):
    """``--out FILE.png`` and ``--out FILE.svg`` write a picture that reads back: a non-empty
    image, a well-formed SVG document."""
    png, svg = tmp_path / "trace.png", tmp_path / "trace.svg"
    assert cli.main(["trace", method, "--causal", "--out", str(png)]) == 0
    assert cli.main(["trace", method, "--out", str(svg)]) == 0
    pixels = image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    assert f"wrote {png}" in capsys.readouterr().out


# sptutor trace arguments -> the library call that raises the sentence they must end with
BAD_ARGUMENTS = {
    "ring --world 0": lambda: trace.TraceConfig("ring", world=0).check(),
    "ring --head-dim 0": lambda: trace.TraceConfig("ring", head_dim=0).check(),
    "ring --heads-kv 3": lambda: checks.check_qkv(
        torch.empty(1, 1, 4, 1), torch.empty(1, 1, 3, 1), torch.empty(1, 1, 3, 1)
    ),
    "ring --seq-len 3": lambda: layout.check_layout(3, world=4, layout="contiguous"),
    "ring --layout zigzag --seq-len 7": lambda: layout.check_layout(7, world=4, layout="zigzag"),
    "ring --cu-seqlens 1,5,16": lambda: layout.check_cu_seqlens(torch.tensor([1, 5, 16]), 16),
    "ring --cu-seqlens 0,9,5,16": lambda: layout.check_cu_seqlens(torch.tensor([0, 9, 5, 16]), 16),
    "ring --seq-len 16 --cu-seqlens 0,5,20": lambda: trace.TraceConfig(
        "ring", seq_len=16, cu_seqlens=(0, 5, 20)
    ).check(),
    "ring --cu-seqlens 0,5,x": lambda: trace.parse_cu_seqlens("0,5,x"),
    "ring --cu-seqlens 16": lambda: layout.check_cu_seqlens(torch.tensor([16]), 16),
    "ring --cu-seqlens 0,2,3": lambda: layout.check_layout(3, world=4, layout="contiguous"),
    "ring --ulysses 2": lambda: trace.TraceConfig("ring", ulysses=2).check(),
    "usp --ulysses 3": lambda: check_mesh_sizes(3, 1, 4),
    "usp --ulysses 0": lambda: trace.TraceConfig("usp", ulysses=0).check(),
    "usp --ulysses 4 --heads-q 2 --heads-kv 1": lambda: checks.check_ulysses_heads(2, 1, 4),
    "ulysses --world 8 --seq-len 16": lambda: checks.check_ulysses_heads(4, 2, 8),
    "lasp --layout striped": lambda: checks.check_linear_layout("striped"),
    "lasp --cu-seqlens 0,5,17,32": lambda: chain.check_documents("lasp", False, True),
    "lasp2 --cu-seqlens 0,5,17,32": lambda: chain.check_documents("lasp2", False, True),
    "ring --out picture.pdf": lambda: trace.check_out(trace.Path("picture.pdf")),
}


@pytest.mark.parametrize("argv, library_call", BAD_ARGUMENTS.items(), ids=BAD_ARGUMENTS.keys())
def test_bad_trace_arguments_exit_2_with_the_library_sentence(argv, library_call, capsys,
                                                               monkeypatch):  # fmt: skip
    """A broken precondition ends in one line ``sptutor trace: error: <the library's sentence>``,
    exit code 2, before anything is simulated."""
    with pytest.raises(ValueError) as raised:
        library_call()
    monkeypatch.setattr(oracle, "simulate", lambda *a, **k: pytest.fail("simulated"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["trace", *argv.split()])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"sptutor trace: error: {raised.value}\n"


def test_trace_help_shows_every_default(capsys):
    """``sptutor trace --help`` is plain text and shows each option's default."""
    with pytest.raises(SystemExit):
        cli.main(["trace", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text
    for shown in ("--world WORLD", "(default: 4)", "(default: 16, or the last offset of "
                  "--cu-seqlens)", "(default: 8)", "--causal", "--forward-only", "--out FILE",
                  "(default: 2)", "--cu-seqlens OFFSETS", "0 first and S last"):  # fmt: skip
        assert shown in text, shown


def _blocks_without_a_visible_pair(positions, offsets, causal):
    """{(rank, block)}: no query of ``rank`` sees a key of ``block`` (same document, and not
    after it when causal), pair by pair from the positions and the document offsets."""

    def document(token):
        return bisect.bisect_right(offsets, token) - 1

    return {
        (rank, block)
        for rank, queries in enumerate(positions)
        for block, keys in enumerate(positions)
        if not any((k <= q or not causal) and document(q) == document(k)
                   for q in queries.tolist() for k in keys.tolist())
    }  # fmt: skip


def _table(text, title, world):
    """The W rows of the printed table under ``title``, each split on whitespace."""
    lines = text.split(title + "\n")[1].splitlines()
    return [line.split() for line in lines[2 : 2 + world]]


# (method, layout, causal, --seq-len or None, --cu-seqlens): even and uneven shards, an empty
# document; rsa and lss (every rank's block a K/V block, as the ring's) on a few
PACKED = [
    ("ring", "contiguous", True, None, "0,5,17,32"),
    ("ring", "zigzag", True, None, "0,5,17,32"),
    ("ring", "striped", True, 30, "0,3,12,12,30"),
    ("ring", "contiguous", True, 19, "0,3,11,19"),
    ("ring", "zigzag", False, None, "0,9,10,21"),
    ("ring", "contiguous", False, None, "0,2,4,6,8,10,12,14,16"),
    ("rsa", "zigzag", True, 22, "0,5,6,22"),
    ("lss", "contiguous", True, 19, "0,3,11,19"),
]


@pytest.mark.parametrize("method, layout_name, causal, seq_len, offsets", PACKED)
def test_trace_shows_each_ranks_documents_and_exactly_the_blocks_with_no_visible_pair(
    method, layout_name, causal, seq_len, offsets, capsys
):
    """The printed trace names the documents each rank's token runs belong to, and lists as
    skipped exactly the (rank, block) pairs with no visible pair: the causal ones apart from those
    that share no document. The ledger has no compute event for them, and one for every other."""
    cut = [int(x) for x in offsets.split(",")]
    argv = ["trace", method, "--layout", layout_name, "--cu-seqlens", offsets]
    argv += ["--causal"] * causal + ["--seq-len", str(seq_len)] * (seq_len is not None)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(f"; {len(cut) - 1} packed documents")
    positions = layout.all_positions(cut[-1], world=4, layout=layout_name)
    for rank, row in enumerate(_table(text, f"documents: cu_seqlens = {offsets}", 4)):
        by_document = {}
        for token in positions[rank].tolist():
            by_document.setdefault(bisect.bisect_right(cut, token) - 1, []).append(token)
        runs = [f"d{n} {trace.token_runs(torch.tensor(t))}" for n, t in by_document.items()]
        assert row[:2] == [str(rank), trace.token_runs(positions[rank])]
        assert " ".join(row[2:]) == "; ".join(runs)
    skipped = _blocks_without_a_visible_pair(positions, cut, causal)
    causal_only = _blocks_without_a_visible_pair(positions, [0, cut[-1]], causal)
    rows = _table(text, "K/V blocks each rank computes in the forward (backward: the same)", 4)
    listed = {name: set() for name in ("computes", "causal", "documents")}
    for rank, row in enumerate(rows):
        assert len(row) == 4 and row[0] == str(rank)
        for name, cell in zip(listed, row[1:]):
            listed[name] |= {(rank, int(b)) for b in cell.split(",") if cell != "-"}
    assert listed["causal"] | listed["documents"] == skipped
    assert listed["causal"] == causal_only and not listed["causal"] & listed["documents"]
    assert listed["computes"] == {(r, b) for r in range(4) for b in range(4)} - skipped
    config = trace.TraceConfig(method, layout=layout_name, causal=causal, seq_len=seq_len,
                               cu_seqlens=tuple(cut))  # fmt: skip
    sim = trace.simulate(config)
    for phase in PHASES:
        computed = {(e.rank, e.block) for e in sim.ledger.events
                    if e.op == "compute" and e.phase == phase and e.block is not None}  # fmt: skip
        assert computed == listed["computes"]
    baseline = trace.simulate(trace.one_document(config))
    ratios = [max(work) / min(work) for work in
              ([s.ledger.macs(r) for r in range(4)] for s in (sim, baseline))]  # fmt: skip
    assert f"busiest / idlest rank: {ratios[0]:.2f} (the same call on one document: " \
        f"{ratios[1]:.2f})" in text  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        ["--seq-len", "10", "--causal", "--layout", "zigzag"],
        ["--seq-len", "13", "--layout", "striped"],
        ["--cu-seqlens", "0,5,17,32", "--causal", "--layout", "zigzag"],
        ["--cu-seqlens", "0,3,3,11,19", "--causal", "--forward-only"],
    ],
    ids=["uneven-zigzag", "uneven-striped", "packed-zigzag", "packed-uneven-empty-doc"],
)
def test_trace_out_draws_uneven_shards_and_packed_documents(options, tmp_path):
    """Uneven S and packed documents draw non-empty PNG and SVG files too."""
    for name in ("trace.png", "trace.svg"):
        path = tmp_path / name
        assert cli.main(["trace", "ring", *options, "--out", str(path)]) == 0
        assert path.stat().st_size > 1000
    assert image.imread(tmp_path / "trace.png").shape[0] > 50
    assert ElementTree.parse(tmp_path / "trace.svg").getroot().tag.endswith("svg")
