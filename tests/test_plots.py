"""The pictures draw what the ledger and the layout say: checked on the artists' data."""

import itertools
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import matplotlib

matplotlib.use("Agg")  # no display in CI; the library itself never picks a backend

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import pyplot as plt

from sptutor import oracle, plots
from sptutor.methods import LINEAR_METHODS, METHODS
from sptutor.plots._style import format_bytes
from tests.helpers import mesh_case
from tests.strategies import attention_inputs

RING_FAMILY = ("rsa", "ring", "lss", "usp")
COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")


@st.composite
def simulations(draw, methods=METHODS):
    """A small simulated call of one of ``methods``: W 1..4, any layout it allows, causal or not,
    forward only or with backward."""
    method = draw(st.sampled_from(methods))
    case = draw(mesh_case(max_world=4, pure_ulysses=method == "ulysses", head_dims=(1, 2)))
    linear = method in LINEAR_METHODS
    return oracle.simulate(
        method, case["q"], case["k"], case["v"], case["dout"] if draw(st.booleans()) else None,
        world=case["world"], causal=case["causal"],
        layout="contiguous" if linear else case["layout"],
        ulysses=case["ulysses"] if method == "usp" else None,
        scale=None if linear else case["scale"],
    )  # fmt: skip


def _simulate(method, world=4, layout="zigzag", causal=True, ulysses=None, seq_len=16):
    q, k, v, dout = attention_inputs(0, 1, seq_len, 4, 2, 3)
    layout = "contiguous" if method in LINEAR_METHODS else layout
    return oracle.simulate(
        method, q, k, v, dout, world=world, causal=causal, layout=layout, ulysses=ulysses
    )


def _by_gid(artists, kind):
    """{(phase, rank, seq): artist} of the artists whose gid is "<kind>:<phase>:<rank>:<seq>"."""
    found = {}
    for artist in artists:
        parts = (artist.get_gid() or "").split(":")
        if parts[0] == kind:
            found[(parts[1], int(parts[2]), int(parts[3]))] = artist
    return found


def _event_key(event):
    return (event.phase, event.rank, event.seq)


def _x_centre(artist) -> float:
    """Where an artist sits along the time axis, in data coordinates."""
    if hasattr(artist, "get_position"):  # a Text
        return artist.get_position()[0]
    if hasattr(artist, "get_x"):  # a Rectangle (its path is the unit square)
        return artist.get_x() + artist.get_width() / 2
    extents = artist.get_path().get_extents()  # a PathPatch, in data coordinates
    return (extents.x0 + extents.x1) / 2


def _bands(ax):
    """{(phase, op, group): [band, ...]} of a schedule's collective bands, by their gids."""
    bands = defaultdict(list)
    for patch in ax.patches:
        parts = (patch.get_gid() or "").split(":")
        if parts[0] in COLLECTIVES:
            group = tuple(int(r) for r in parts[2].split(","))
            bands[(parts[1], parts[0], group)].append(patch)
    return bands


def _calls(events, phase, op, group):
    """{rank: its events of this (phase, op, group) in order}: the k-th of each is call k."""
    return {
        r: [e for e in events if (e.phase, e.op, e.group, e.rank) == (phase, op, group, r)]
        for r in group
    }


@given(simulations())
def test_schedule_draws_every_message_and_compute_of_the_ledger(sim):
    """One arrow per send (labelled with its bytes), one band per collective call over exactly its
    group's lanes (labelled with its bytes), one compute box per compute shaded by macs/max."""
    fig = plots.schedule(sim)
    ax = fig.axes[0]
    events = sim.ledger.events
    sends = [e for e in events if e.op == "send"]
    arrows = _by_gid(ax.patches, "send")
    assert sorted(arrows) == sorted(map(_event_key, sends))
    for event in sends:
        assert arrows[_event_key(event)].get_label() == format_bytes(event.nbytes)
    computes = [e for e in events if e.op == "compute"]
    most = max((e.macs for e in computes), default=0)
    boxes = _by_gid(ax.patches, "compute")
    assert sorted(boxes) == sorted(map(_event_key, computes))
    for event in computes:
        assert boxes[_event_key(event)].get_facecolor()[3] == pytest.approx(event.macs / most)
    # collectives: each member logs one event, so a call is len(group) events
    calls = Counter((e.phase, e.op, e.group) for e in events if e.op in COLLECTIVES)
    bands = _bands(ax)
    assert {key: len(found) for key, found in bands.items()} == {
        key: count // len(key[2]) for key, count in calls.items()
    }
    for (phase, op, group), found in bands.items():
        mine = _calls(events, phase, op, group)
        for band in found:
            x = _x_centre(band)
            covered = [r for r in range(sim.world) if band.get_path().contains_point((x, r))]
            assert covered == sorted(group)
            sizes = {mine[r][int(band.get_gid().split(":")[3])].nbytes for r in group}
            assert len(sizes) == 1 and band.get_label() == format_bytes(sizes.pop())
    plt.close(fig)


@given(simulations())
def test_schedule_keeps_each_ranks_order_and_the_phases_apart(sim):
    """Along each lane a rank's events come in its own order (seq); forward events lie left of
    the divider, backward ones right of it."""
    fig = plots.schedule(sim)
    ax = fig.axes[0]
    events = sim.ledger.events
    x_of = {key: _x_centre(a) for key, a in _by_gid(ax.patches, "compute").items()}
    x_of.update({key: _x_centre(a) for key, a in _by_gid(ax.texts, "send-label").items()})
    for (phase, op, group), found in _bands(ax).items():
        mine = _calls(events, phase, op, group)
        for band in found:
            for rank in group:
                x_of[_event_key(mine[rank][int(band.get_gid().split(":")[3])])] = _x_centre(band)
    assert sorted(x_of) == sorted(map(_event_key, events))
    for rank in range(sim.world):
        mine = [e for e in events if e.rank == rank]
        lane = sorted((e.phase != "forward", e.seq, x_of[_event_key(e)]) for e in mine)
        assert all(a[2] < b[2] for a, b in itertools.pairwise(lane)), lane
    dividers = [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "phase-divider"]
    assert len(dividers) == len({e.phase for e in events}) - 1
    for (phase, _, _), x in x_of.items():
        assert all((x < divider) == (phase == "forward") for divider in dividers)
    plt.close(fig)


@given(simulations(RING_FAMILY))
def test_ownership_colours_each_pair_by_the_rank_whose_compute_event_covers_it(sim):
    """Cell (i, j) is the rank owning query i, computing on the block holding key j (its ulysses
    group's under usp); masked cells are blank; each tile's label is its compute events' steps."""
    fig = plots.ownership(sim)
    ax = fig.axes[0]
    (image,) = [im for im in ax.images if im.get_gid() == "ownership"]
    drawn = np.ma.filled(np.ma.masked_invalid(image.get_array()).astype(float), np.nan)
    seq_len, degree = sim.shape[1], sim.ulysses
    owner = np.empty(seq_len, dtype=int)
    for rank, positions in enumerate(sim.positions):
        owner[positions.numpy()] = rank
    steps = defaultdict(set)
    for e in sim.ledger.events:
        if e.op == "compute" and e.phase == "forward" and e.block is not None:
            steps[(e.rank, e.block)].add(e.step)
    expected = np.full((seq_len, seq_len), np.nan)
    for i in range(seq_len):
        for j in range(seq_len):
            blocks = [b for (r, b) in steps if r == owner[i] and b // degree == owner[j] // degree]
            if blocks and (j <= i or not sim.causal):
                expected[i, j] = owner[i]
    np.testing.assert_array_equal(drawn, expected)
    visible = np.tril(np.ones((seq_len, seq_len), bool)) if sim.causal else True
    assert not np.isnan(expected[visible]).any()  # every visible pair is computed by someone
    labels = defaultdict(set)
    for text in ax.texts:
        if (text.get_gid() or "").startswith("step:"):
            _, rank, block, _ = text.get_gid().split(":")
            labels[(int(rank), int(block))].add(text.get_text())
    assert {key: {",".join(map(str, sorted(found)))} for key, found in steps.items()} == labels
    plt.close(fig)


@pytest.mark.parametrize(
    ("picture", "methods"),
    [
        (plots.ownership, ("ulysses", "lasp", "lasp2")),
        (plots.heads_and_tokens, ("rsa", "ring", "lss", "lasp", "lasp2")),
        (plots.state_chain, ("rsa", "ring", "ulysses", "usp", "lss")),
    ],
)
def test_pictures_refuse_methods_they_do_not_describe(picture, methods):
    """ownership, heads_and_tokens and state_chain raise ValueError for other methods."""
    for method in methods:
        with pytest.raises(ValueError, match=method):
            picture(_simulate(method, ulysses=2 if method == "usp" else None))


@given(simulations(("ulysses", "usp")))
def test_heads_and_tokens_match_the_layout_and_the_first_all_to_all(sim):
    """Before: each rank holds every head of its own tokens. After: member u of a ulysses group
    holds heads u·Hq/U.. of the group's tokens. The arrow carries the all-to-alls' bytes."""
    fig = plots.heads_and_tokens(sim)
    ax = fig.axes[0]
    images = {im.get_gid(): np.asarray(im.get_array()) for im in ax.images}
    heads_q, degree = sim.shape[2], sim.world if sim.method == "ulysses" else sim.ulysses
    per_rank = heads_q // degree
    before = np.full((heads_q, sim.shape[1]), -1)
    after = np.full((heads_q, sim.shape[1]), -1)
    for rank, positions in enumerate(sim.positions):
        before[:, positions.numpy()] = rank
        group = range(rank // degree * degree, rank // degree * degree + degree)
        tokens = np.concatenate([sim.positions[r].numpy() for r in group])
        member = rank % degree
        after[member * per_rank : (member + 1) * per_rank, tokens[:, None]] = rank
    np.testing.assert_array_equal(images["before"], before)
    np.testing.assert_array_equal(images["after"], after)
    sent = []
    for rank in range(sim.world):
        mine = sorted((e for e in sim.ledger.events if e.rank == rank), key=lambda e: e.seq)
        first = next(i for i, e in enumerate(mine) if e.op == "compute")
        sent.append(sum(e.nbytes for e in mine[:first] if e.op == "all_to_all"))
    (arrow,) = [p for p in ax.patches if p.get_gid() == "all_to_all:forward"]
    assert arrow.get_label() == format_bytes(max(sent))
    plt.close(fig)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp_state_chain_is_w_minus_1_arrows_each_way_with_the_states_bytes(world):
    """Causal LASP: W-1 forward arrows r -> r+1 and W-1 backward r+1 -> r, each labelled with
    the (B, Hq, D, D) state's bytes; LASP-2: one all-gather band per phase over every rank."""
    sim = _simulate("lasp", world=world, seq_len=12)
    batch, _, heads_q, _, head_dim = sim.shape
    state = format_bytes(batch * heads_q * head_dim * head_dim * sim.out.dtype.itemsize)
    fig = plots.state_chain(sim)
    arrows = _by_gid(fig.axes[0].patches, "send")
    sends = {_event_key(e): e for e in sim.ledger.events if e.op == "send"}
    assert sorted(arrows) == sorted(sends)
    for phase, hop in (("forward", 1), ("backward", -1)):
        hops = sorted((e.rank, e.peer) for e in sends.values() if e.phase == phase)
        assert hops == sorted((r, r + hop) for r in range(world) if 0 <= r + hop < world)
    assert {arrow.get_label() for arrow in arrows.values()} == {state}
    plt.close(fig)
    sim = _simulate("lasp2", world=world, seq_len=12)
    fig = plots.state_chain(sim)
    bands = {p.get_gid(): p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("all")}
    ranks = ",".join(map(str, range(world)))
    assert sorted(bands) == [f"all_gather:{phase}:{ranks}:0" for phase in ("backward", "forward")]
    for gid, band in bands.items():
        phase = gid.split(":")[1]
        sizes = {e.nbytes for e in sim.ledger.events if e.op == "all_gather" and e.phase == phase}
        assert [band.get_label()] == [format_bytes(size) for size in sizes]
    plt.close(fig)


def test_cost_curves_draw_one_line_per_method_through_its_points():
    """One line per method, its points sorted by x, on log-log axes; bad x or y is a ValueError."""
    rows = [
        {"method": m, "world": w, "seq_len": 1024, "sent": 10 * w + i, "saved": 7 * w}
        for i, m in enumerate(("ring", "ulysses", "lasp"))
        for w in (8, 2, 4)
    ]
    fig = plots.cost_curves(rows, x="world", y="sent")
    ax = fig.axes[0]
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert sorted(lines) == ["cost:lasp", "cost:ring", "cost:ulysses"]
    for i, method in enumerate(("ring", "ulysses", "lasp")):
        assert list(lines[f"cost:{method}"].get_xdata()) == [2, 4, 8]
        assert list(lines[f"cost:{method}"].get_ydata()) == [10 * w + i for w in (2, 4, 8)]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    plt.close(fig)
    for x, y in (("heads", "sent"), ("world", "bytes")):
        with pytest.raises(ValueError, match="x must be one of"):
            plots.cost_curves(rows, x=x, y=y)


def test_balance_draws_one_bar_per_layout_and_rank_with_its_macs():
    """A bar per (layout, rank) of height macs; each group's label gives its max/min ratio."""
    rows = [
        {"layout": layout, "rank": rank, "macs": macs}
        for layout, values in (("contiguous", (1, 3, 5, 7)), ("zigzag", (4, 4, 4, 4)))
        for rank, macs in enumerate(values)
    ]
    fig = plots.balance(rows)
    ax = fig.axes[0]
    bars = {p.get_gid(): p.get_height() for p in ax.patches if p.get_gid()}
    assert bars == {f"balance:{r['layout']}:{r['rank']}": r["macs"] for r in rows}
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["contiguous\nmax/min = 7.00", "zigzag\nmax/min = 1.00"]
    plt.close(fig)


def _every_picture():
    """(name, draw(ax)) for every function of sptutor.plots, on calls it describes."""
    ring, usp = _simulate("ring"), _simulate("usp", ulysses=2)
    rows = [{"method": "ring", "world": w, "seq_len": 64, "sent": w, "saved": w} for w in (2, 4)]
    balance = [{"layout": "zigzag", "rank": r, "macs": 5} for r in range(4)]
    return [
        ("schedule", lambda ax: plots.schedule(usp, ax=ax)),
        ("ownership", lambda ax: plots.ownership(ring, ax=ax)),
        ("heads_and_tokens", lambda ax: plots.heads_and_tokens(usp, ax=ax)),
        ("state_chain", lambda ax: plots.state_chain(_simulate("lasp2"), ax=ax)),
        ("cost_curves", lambda ax: plots.cost_curves(rows, x="world", y="saved", ax=ax)),
        ("balance", lambda ax: plots.balance(balance, ax=ax)),
        ("block_work", lambda ax: plots.block_work(_packed("ring"), ax=ax)),
        ("useful_work", lambda ax: plots.useful_work(_packed("ring"), ax=ax)),
        ("uneven", lambda ax: plots.ownership(_simulate("ring", seq_len=10), ax=ax)),
    ]


def test_every_picture_draws_into_the_given_axes_and_saves_as_png_and_svg(tmp_path):
    """With ax= each function returns that axes' figure; PNG and SVG files are valid and
    non-empty (for_simulation's figure too)."""
    figures = []
    for name, draw in _every_picture():
        fig, ax = plt.subplots()
        assert draw(ax) is fig
        figures.append((name, fig))
    figures.append(("trace_usp", plots.for_simulation(_simulate("usp", ulysses=2))))
    figures.append(("trace_lasp", plots.for_simulation(_simulate("lasp"))))
    for name, fig in figures:
        fig.savefig(tmp_path / f"{name}.png", dpi=40)
        fig.savefig(tmp_path / f"{name}.svg")
        image = mpimg.imread(tmp_path / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
        assert ET.parse(tmp_path / f"{name}.svg").getroot().tag.endswith("svg")
        plt.close(fig)


def test_for_simulation_puts_the_methods_own_pictures_under_the_schedule():
    """usp: schedule, ownership, heads_and_tokens; lasp: schedule, state_chain."""
    fig = plots.for_simulation(_simulate("usp", ulysses=2))
    gids = [{im.get_gid() for im in ax.images} for ax in fig.axes]
    assert gids == [set(), {"ownership"}, {"before", "after"}]
    plt.close(fig)
    fig = plots.for_simulation(_simulate("lasp"))
    assert len(fig.axes) == 2
    assert any(p.get_gid() == "send:forward:0:2" for p in fig.axes[1].patches)
    plt.close(fig)


def _packed(method, layout="zigzag", causal=True, offsets=(0, 5, 17, 32)):
    """A call on packed documents (``offsets``: cu_seqlens; S is the last), W = 4."""
    q, k, v, dout = attention_inputs(0, 1, offsets[-1], 4, 2, 3)
    return oracle.simulate(
        method, q, k, v, dout, world=4, causal=causal,
        layout="contiguous" if method in LINEAR_METHODS else layout,
        ulysses=2 if method == "usp" else None, cu_seqlens=torch.tensor(offsets),
    )  # fmt: skip


def _documents(offsets, seq_len):
    """(S,) the document of each token, the slow way."""
    return np.array([sum(1 for o in offsets[1:] if o <= t) for t in range(seq_len)])


PACKED_CASES = [
    ("ring", "contiguous", True, (0, 5, 17, 32)),
    ("ring", "zigzag", True, (0, 5, 17, 32)),
    ("ring", "striped", False, (0, 3, 3, 11, 19)),
    ("lss", "contiguous", True, (0, 9, 10, 22)),
    ("rsa", "striped", True, (0, 7, 13)),
    ("usp", "zigzag", True, (0, 5, 17, 32)),
]


@pytest.mark.parametrize("method, layout, causal, offsets", PACKED_CASES)
def test_packed_ownership_and_block_work_show_documents_and_skipped_blocks(
    method, layout, causal, offsets
):
    """ownership: cells across documents are blank, a line at each document's first token, the
    skipped blocks' tiles hatched. block_work: each (rank, block) cell holds its forward MACs
    (shade macs/max), or says why it is skipped; skipped = no visible pair = no compute event."""
    sim = _packed(method, layout, causal, offsets)
    seq_len, degree = offsets[-1], sim.ulysses
    owner = np.empty(seq_len, dtype=int)
    for rank, positions in enumerate(sim.positions):
        owner[positions.numpy()] = rank
    docs = _documents(offsets, seq_len)
    seen = (docs[:, None] == docs[None, :]) & (np.tri(seq_len, dtype=bool) if causal else True)
    tokens = [np.flatnonzero(owner // degree == r // degree) for r in range(4)]  # group's tokens
    macs = defaultdict(int)
    for e in sim.ledger.events:
        if e.op == "compute" and e.phase == "forward":
            macs[(e.rank, e.block)] += e.macs
    pairs = [(r, b) for r in range(4) for b in range(4) if r % degree == b % degree]
    blank = {p for p in pairs if not seen[np.ix_(tokens[p[0]], tokens[p[1]])].any()}
    assert blank == {p for p in pairs if p not in macs}  # skipped = no visible pair
    fig = plots.ownership(sim)
    ax = fig.axes[0]
    (image,) = [im for im in ax.images if im.get_gid() == "ownership"]
    drawn = np.ma.filled(np.ma.masked_invalid(image.get_array()).astype(float), np.nan)
    np.testing.assert_array_equal(drawn, np.where(seen, owner[:, None], np.nan))
    hatched = {tuple(map(int, p.get_gid().split(":")[1:3])) for p in ax.patches
               if (p.get_gid() or "").startswith("skipped:")}  # fmt: skip
    assert {(r // degree, b // degree) for r, b in hatched} == {
        (r // degree, b // degree) for r, b in blank}  # fmt: skip
    lines = {line.get_gid() for line in ax.lines if (line.get_gid() or "").startswith("document")}
    inner = {o for o in offsets if 0 < o < seq_len}
    assert lines == {f"document{kind}:{o}" for o in inner for kind in ("", "-row")}
    plt.close(fig)
    fig = plots.block_work(sim)
    cells = {p.get_gid(): p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("block")}
    assert len(cells) == 16
    most = max(macs.values())
    for r, b in pairs:
        cell = cells[f"block:{r}:{b}"]
        if (r, b) in blank:
            queries, keys = tokens[r], tokens[b]
            causal_only = causal and not (queries[:, None] >= keys[None, :]).any()
            assert cell.get_label() == f"skipped: {'causal' if causal_only else 'documents'}"
        else:
            assert cell.get_label() == f"{macs[(r, b)]} MACs"
            assert cell.get_facecolor()[3] == pytest.approx(macs[(r, b)] / most)
    assert all(cells[f"block:{r}:{b}"].get_label() == "other ring"
               for r in range(4) for b in range(4) if (r, b) not in pairs)  # fmt: skip
    plt.close(fig)


def test_for_simulation_of_packed_documents_adds_the_blocks_and_the_useful_work():
    """Packed: ring gets block_work and useful_work under its schedule and ownership, the bars
    each rank's MACs packed and on one document; ulysses' heads and lasp's boxes show documents."""
    sim, baseline = _packed("ring"), _simulate("ring", seq_len=32)
    fig = plots.for_simulation(sim, baseline=baseline)
    assert [ax.get_title().split()[0] for ax in fig.axes] == [
        "Schedule:", "Who", "Useful", "Useful"]  # fmt: skip
    bars = {p.get_gid(): p.get_height() for p in fig.axes[3].patches if p.get_gid()}
    assert bars == {
        **{f"balance:3 packed documents:{r}": sim.ledger.macs(r) for r in range(4)},
        **{f"balance:one document (no packing):{r}": baseline.ledger.macs(r) for r in range(4)},
    }
    plt.close(fig)
    fig = plots.heads_and_tokens(_packed("ulysses"))
    gids = [line.get_gid() for line in fig.axes[0].lines if line.get_gid()]
    assert sorted(gids) == [
        f"document:{p}:{panel}" for p in (17, 5) for panel in ("after", "before")
    ]
    plt.close(fig)
    fig = plots.state_chain(_packed("lasp", causal=True))
    boxes = [t.get_text() for t in fig.axes[0].texts if t.get_text().startswith("rank")]
    assert [box.split("\n")[-1] for box in boxes] == ["docs 0,1", "docs 1", "docs 1,2", "docs 2"]
    plt.close(fig)


@pytest.mark.parametrize(
    "code",
    [
        "import matplotlib; before = matplotlib.get_backend(); import sptutor.plots; "
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())",
        # (get_backend itself imports pyplot, hence a run of its own)
        "import sys; import sptutor.plots; assert 'matplotlib.pyplot' not in sys.modules",
    ],
)
def test_importing_the_pictures_leaves_the_backend_alone(code):
    """In a fresh interpreter, importing sptutor.plots keeps matplotlib's backend as it was and
    does not even import pyplot."""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
