"""The ``sptutor`` command: help a newcomer can read, --version, and bad ``train`` arguments
refused up front with the library's own sentence, before any process starts."""

import dataclasses
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sptutor import checks, cli, launch, layout, train, ulysses
from sptutor.mesh import check_mesh_sizes
from sptutor.model import GPTConfig, TinyGPT

FLAGS = ("-h", "--baseline")  # switches: no value, so no default to show


def help_text(argv: list[str], capsys) -> str:
    """What ``sptutor <argv> --help`` prints (and that it exits 0)."""
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.fixture
def no_spawn(monkeypatch):
    """Make starting processes fail the test."""

    def spawn(*args, **kwargs):
        raise AssertionError("a training process was started")

    monkeypatch.setattr(launch, "spawn", spawn)


@pytest.mark.parametrize("argv", [[], ["tour"], ["bench"], ["train"]])
def test_help_is_plain_text(argv, capsys):
    """No command's help shows docstring markup (``double backquotes``)."""
    text = help_text(argv, capsys)
    assert "``" not in text and ("sequence" in text or "Triton" in text)


def test_top_level_help_names_every_command_and_where_to_go_next(capsys):
    """``sptutor --help`` says what sptutor is, lists tour, bench, train and points onwards."""
    text = " ".join(help_text([], capsys).split())
    assert "sequence parallelism for attention" in text
    assert all(re.search(rf"\b{name}\b ", text) for name in ("tour", "bench", "train"))
    assert "sptutor train --help" in text and "docs/" in text
    root = Path(__file__).resolve().parents[1]  # the places it names are the repository's
    assert (root / "chapters").is_dir() and (root / "mkdocs.yml").is_file()
    assert "chapters/ folder" in text and "'mkdocs serve' in the repository's root" in text


def test_every_train_option_shows_its_default(capsys):
    """Each option of ``sptutor train`` has a help string ending in its TrainConfig default."""
    text = help_text(["train"], capsys)
    options = text.split("options:")[1]
    blocks = {
        b.split()[0].rstrip(","): " ".join(b.split()) for b in re.split(r"\n  (?=-)", options)[1:]
    }
    for field in dataclasses.fields(train.TrainConfig):
        block = blocks.pop("--" + field.name.replace("_", "-"))
        shown = "(default: " if field.default is None else f"(default: {field.default})"
        assert shown in block, block
    assert sorted(blocks) == sorted(FLAGS)  # nothing else, and the flags have help too
    assert all(len(block.split()) > 2 for block in blocks.values())


def test_version_prints_the_installed_version(capsys):
    """``sptutor --version`` prints the installed package's version."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sptutor {metadata.version('sptutor')}\n"


def test_python_m_sptutor_runs_the_command():
    """``python -m sptutor --version`` works, like the console script."""
    done = subprocess.run(
        [sys.executable, "-m", "sptutor", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sptutor {metadata.version('sptutor')}\n"


# sptutor train arguments -> the library call that raises the sentence they must end with
BAD_ARGUMENTS = {
    "--method ulysses --world 3 --seq-len 63": lambda: checks.check_ulysses_heads(4, 2, 3),
    "--method ulysses --world 4 --seq-len 3": lambda: layout.check_layout(
        3, world=4, layout="contiguous"
    ),
    "--method lasp --layout zigzag": lambda: GPTConfig(attention="lasp", layout="zigzag"),
    "--d-model 64 --heads-q 6": lambda: GPTConfig(d_model=64, heads_q=6, heads_kv=2),
    "--d-model 64 --heads-q 4 --heads-kv 3": lambda: GPTConfig(d_model=64, heads_q=4, heads_kv=3),
    "--world 4 --sp 3": lambda: train.TrainConfig(world=4, sp=3).grid_sizes(),
    "--world 4 --dp 3": lambda: train.TrainConfig(world=4, dp=3).grid_sizes(),
    "--method usp --world 4 --ulysses 3": lambda: check_mesh_sizes(3, 1, 4),
    "--method usp --world 4 --ulysses 8": lambda: check_mesh_sizes(8, 0, 4),
    "--method usp --world 4 --ulysses 4 --heads-q 2 --heads-kv 1 --d-model 16": (
        lambda: checks.check_ulysses_heads(2, 1, 4)
    ),
    "--layout zigzag --world 4 --seq-len 7": lambda: layout.check_layout(
        7, world=4, layout="zigzag"
    ),
    "--method usp --world 4 --ulysses 2 --seq-len 3": lambda: layout.check_layout(
        3, world=4, layout="contiguous", ulysses=2
    ),
    "--pack-documents -1": lambda: train.TrainConfig(pack_documents=-1).check(),
    "--method ring --ulysses 2": lambda: GPTConfig(attention="ring", ulysses=2),
    "--steps 0": lambda: train.TrainConfig(steps=0).check(),
    "--world 0": lambda: train.TrainConfig(world=0).check(),
    "--sp 0": lambda: train.TrainConfig(sp=0).check(),
    "--lr -1": lambda: train.TrainConfig(lr=-1.0).check(),
    "--seq-len 100000": lambda: train.TrainConfig(seq_len=100_000).check(),
}


@pytest.mark.parametrize("argv, library_call", BAD_ARGUMENTS.items(), ids=BAD_ARGUMENTS.keys())
def test_bad_train_arguments_exit_2_with_the_library_sentence(argv, library_call, capsys, no_spawn):
    """A broken precondition ends in one line ``sptutor train: error: <the library's sentence>``,
    exit code 2, and no process is started."""
    with pytest.raises(ValueError) as raised:
        library_call()
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", *argv.split()])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"sptutor train: error: {raised.value}\n"


def test_train_run_checks_before_starting_processes(no_spawn):
    """The Python API refuses the same way: ``train.run`` raises ValueError before spawning."""
    with pytest.raises(ValueError, match=re.escape("need Hq % Hkv == 0")):
        train.run(train.TrainConfig(heads_kv=3), verbose=False)


def test_train_options_reach_the_config(monkeypatch, capsys):
    """The options given land in the TrainConfig fields of their names; the others keep the
    fields' defaults, and the run starts W processes."""
    started = {}

    def spawn(fn, world, args):
        started.update(world=world, config=args[0])
        return [[4.0] * args[0].steps]

    monkeypatch.setattr(launch, "spawn", spawn)
    options = "--method usp --dp 2 --ulysses 1 --seq-len 32 --heads-kv 1 --lr 0.01 --layout striped"
    assert cli.main(["train", *options.split(), "--dtype", "float64"]) == 0
    expected = train.TrainConfig(method="usp", dp=2, ulysses=1, seq_len=32, heads_kv=1, lr=0.01,
                                 layout="striped", dtype="float64")  # fmt: skip
    assert started == {"world": expected.world, "config": expected}
    assert "usp: W=4 as SP=2 (U=1 x R=2) x DP=2" in capsys.readouterr().out


HEADS = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 3), (8, 2)]  # (Hq, Hkv)


@given(
    method=st.sampled_from(train.METHODS), layout_name=st.sampled_from(layout.LAYOUTS),
    world=st.integers(1, 4), dp=st.sampled_from([None, 1, 2]),
    degree=st.sampled_from([None, 1, 2, 4]), seq_len=st.sampled_from([8, 12, 16, 24, 32]),
    heads=st.sampled_from(HEADS), head_dim=st.sampled_from([2, 3, 4]),
)  # fmt: skip
def test_a_config_that_passes_check_sets_up_on_every_rank(
    method, layout_name, world, dp, degree, seq_len, heads, head_dim
):
    """Whatever TrainConfig.check accepts, every rank's setup before its first message works:
    the model, its piece of the batch, the method's own input checks (no error after spawning)."""
    heads_q, heads_kv = heads
    config = train.TrainConfig(
        method=method, world=world, dp=dp, ulysses=degree if method == "usp" else None,
        layout=layout_name, seq_len=seq_len, d_model=heads_q * head_dim, heads_q=heads_q,
        heads_kv=heads_kv, layers=1, batch=1,
    )  # fmt: skip
    try:
        config.check()
    except ValueError:
        return
    ids, vocab = train.load_corpus()
    sp, dp = config.grid_sizes()
    model_config = config.model_config(vocab)
    TinyGPT(model_config)
    batch = train.global_batch(ids, config, step=0)
    for rank in range(world):
        dp_rank, sp_rank = divmod(rank, sp)
        grid = SimpleNamespace(sp=sp, dp=dp, sp_rank=sp_rank, dp_rank=dp_rank)
        inputs, _ = train.local_batch(*batch, grid, model_config)  # (1, S/sp)
        q = torch.zeros(1, inputs.shape[1], heads_q, head_dim)  # (B, S/sp, Hq, D)
        k = torch.zeros(1, inputs.shape[1], heads_kv, head_dim)  # (B, S/sp, Hkv, D)
        if method in ("ulysses", "usp"):
            ulysses._check_inputs(q, k, k, sp if method == "ulysses" else config.ulysses_degree())


def test_peer_timing_without_the_peers_extra_says_which_extra(tmp_path):
    """scripts/peer_timing.py where yunchang is missing: exit 2 and the install line, before
    any process starts (it printed a traceback from a spawned rank)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "peer_timing.py"
    blocked = ("import runpy, sys; sys.modules['yunchang'] = None; sys.argv = ['peer_timing.py']; "
               f"runpy.run_path({str(script)!r}, run_name='__main__')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    said = 'yunchang is not installed; it comes with the peers extra: pip install -e ".[peers]"'
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_training_page_names_every_train_option(capsys):
    """docs/training.md's Options paragraph names each flag ``sptutor train --help`` shows."""
    flags = set(re.findall(r"^  (--[\w-]+)", help_text(["train"], capsys), re.MULTILINE))
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert {"--rope-per-document", "--pack-documents", "--baseline"} <= flags  # the pattern holds
    missing = sorted(f for f in flags - {"--help"} if f"`{f}" not in page)
    assert not missing, f"docs/training.md does not name {missing}"
