"""``sptutor trace``: its table is the oracle's ledger event by event, it draws a valid PNG or SVG
for every method, and bad arguments are refused up front with the library's sentence."""

import xml.etree.ElementTree as ElementTree

import pytest
import torch
from matplotlib import image

from sptutor import checks, cli, layout, oracle, trace
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
    "ring --seq-len 10": lambda: layout.check_layout(10, world=4, layout="contiguous"),
    "ring --layout zigzag --seq-len 12": lambda: layout.check_layout(12, world=4, layout="zigzag"),
    "ring --ulysses 2": lambda: trace.TraceConfig("ring", ulysses=2).check(),
    "usp --ulysses 3": lambda: check_mesh_sizes(3, 1, 4),
    "usp --ulysses 0": lambda: trace.TraceConfig("usp", ulysses=0).check(),
    "usp --ulysses 4 --heads-q 2 --heads-kv 1": lambda: checks.check_ulysses_heads(2, 1, 4),
    "ulysses --world 8 --seq-len 16": lambda: checks.check_ulysses_heads(4, 2, 8),
    "lasp --layout striped": lambda: checks.check_linear_layout("striped"),
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
    for shown in ("--world WORLD", "(default: 4)", "(default: 16)", "(default: 8)", "--causal",
                  "--forward-only", "--out FILE", "(default: 2)"):  # fmt: skip
        assert shown in text, shown
