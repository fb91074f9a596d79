"""``torchrun -m sptutor.train`` on CPU (gloo): on one node, and on two "nodes" (two torchrun
agents on this machine meeting at a c10d rendezvous), where sptutor's own ring and Ulysses are
also checked against the oracle across the four ranks. The losses must be the spawn run's
(``train.run``) exactly: the same model, the same batches, the same gloo reductions, one thread
per rank, so nothing is left to round differently (the printed lines show 4 decimals; the script
below compares every bit)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sptutor import cli, console, train

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # every torchrun launch: nothing hangs the suite
SMALL = dict(seq_len=16, d_model=16, heads_q=2, heads_kv=1, layers=1, batch=2)
RUN = [sys.executable, "-m", "torch.distributed.run"]
SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch.distributed as dist

    from sptutor import torchrun, train
    from sptutor.testing import check_sptutor

    if __name__ == "__main__":
        torchrun.init()  # gloo here; NCCL on cuda:LOCAL_RANK on GPUs
        reports = [check_sptutor(method, examples=3) for method in ("ring", "ulysses")]
        config = train.TrainConfig(method="usp", world=4, steps=2, **json.loads(sys.argv[1]))
        result = train.run_torchrun(config, verbose=False)
        if torchrun.is_first():
            print(*reports, sep="\\n")
            print("losses", repr(result.losses))
        dist.destroy_process_group()
        raise SystemExit(0 if all(report.passed for report in reports) else 1)
    """
)


def _environment() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT)}


def _options(method: str, steps: int) -> list[str]:
    """``-m sptutor.train`` with ``SMALL``: its command-line options."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    return ["-m", "sptutor.train", f"--method={method}", f"--steps={steps}", *flags]


def _step_lines(method: str, losses: list[float]) -> list[str]:
    """The step lines rank 0 prints for these losses, without their seconds."""
    lines = [console.step_line(method, i + 1, len(losses), x, 0.0) for i, x in enumerate(losses)]
    return [line.rsplit("  ", 1)[0] for line in lines]


def _assert_printed_once(stdout: str, method: str, losses: list[float]) -> None:
    """Each step line of the spawn run's losses is printed exactly once (by rank 0)."""
    for line in _step_lines(method, losses):
        assert stdout.count(line + "  ") == 1, f"{line!r} not printed once:\n{stdout}"


def _free_port() -> int:
    """A port free now: bound to port 0, read, closed (torchrun's c10d store takes it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _agents(tmp_path: Path, launches: list[list[str]]) -> tuple[list[int], str, str]:
    """Start one torchrun agent per launch (its options after ``torchrun``), all together, and
    wait for them, ``TIMEOUT_S`` in all; returns their exit codes and their stdout and stderr,
    joined. Agents still running at the timeout (or when the test fails meanwhile) are ended."""
    logs = [
        [tmp_path / f"agent{i}.{kind}" for kind in ("out", "err")] for i in range(len(launches))
    ]
    agents = []
    with contextlib.ExitStack() as files:
        try:
            for launch, paths in zip(launches, logs):
                out, err = (files.enter_context(path.open("w")) for path in paths)
                agents.append(subprocess.Popen([*RUN, *launch], stdout=out, stderr=err,
                                               env=_environment()))  # fmt: skip
            deadline = time.monotonic() + TIMEOUT_S
            codes = [agent.wait(timeout=max(1.0, deadline - time.monotonic())) for agent in agents]
        finally:
            _end(agents)
    return codes, *("".join(paths[k].read_text() for paths in logs) for k in (0, 1))


def _two_nodes(tmp_path: Path, *target: str) -> tuple[list[int], str, str]:
    """``target`` (a script or ``-m module``, with arguments) on two torchrun agents of 2 ranks
    each, meeting at a c10d rendezvous on a port free now and a job id of their own."""
    endpoint, job = f"127.0.0.1:{_free_port()}", f"sptutor-{uuid.uuid4().hex[:12]}"
    launches = [["--nnodes", "2", "--nproc_per_node", "2", "--node-rank", str(node),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", job, *target]
                for node in (0, 1)]  # fmt: skip
    return _agents(tmp_path, launches)


def _end(agents: list[subprocess.Popen]) -> None:
    """End the agents still running: SIGTERM first, on which torchrun ends its ranks (they run in
    sessions of their own: a killed agent would leave them behind), then SIGKILL."""
    running = [agent for agent in agents if agent.poll() is None]
    for agent in running:
        agent.terminate()
    for agent in running:
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def test_torchrun_on_one_node_trains_as_spawn_does_and_rank_0_prints(tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m sptutor.train --method ring``: exit 0, the
    run's line and each step's line printed once (rank 0), the losses those of ``train.run``."""
    config = train.TrainConfig(method="ring", world=2, steps=3, **SMALL)
    launch = ["--standalone", "--nproc_per_node", "2", *_options("ring", 3)]
    codes, stdout, stderr = _agents(tmp_path, [launch])
    assert codes == [0], stdout + stderr
    assert stdout.count(config.describe()) == 1, stdout
    _assert_printed_once(stdout, "ring", train.run(config, verbose=False).losses)


def test_two_nodes_check_sptutor_against_the_oracle_and_train_as_spawn_does(tmp_path):
    """Two agents of 2 ranks: ``check`` passes sptutor's ring and Ulysses on the 4 ranks, and
    usp trains to the spawn run's losses, bit for bit (the script) and as printed (``-m
    sptutor.train``)."""
    script = tmp_path / "two_nodes.py"
    script.write_text(SCRIPT)
    codes, stdout, stderr = _two_nodes(tmp_path, str(script), json.dumps(SMALL))
    assert codes == [0, 0], stdout + stderr
    for method in ("ring", "ulysses"):
        assert stdout.count(f"{method}_attention matches the {method} oracle in all 3 cases") == 1
    config = train.TrainConfig(method="usp", world=4, steps=2, **SMALL)
    spawned = train.run(config, verbose=False).losses
    assert f"losses {spawned!r}\n" in stdout, stdout  # every bit: see the module's docstring
    codes, stdout, stderr = _two_nodes(tmp_path, *_options("usp", 2))
    assert codes == [0, 0], stdout + stderr
    assert stdout.count(config.describe()) == 1, stdout
    _assert_printed_once(stdout, "usp", spawned)


def test_under_torchrun_a_world_other_than_world_size_stops_every_rank_rank_0_saying_why(
    monkeypatch, capsys
):
    """``--world`` must be torchrun's WORLD_SIZE: exit code 2 before any process group, the
    sentence printed once (rank 0), the other ranks silent. (torchrun's environment, faked.)"""
    fake = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in fake.items():
        monkeypatch.setenv(name, value)
    said = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exited:
            cli.main(["train", "--world", "4"])
        assert exited.value.code == 2
        said.append(capsys.readouterr().err)
    sentence = "--world 4 is not torchrun's WORLD_SIZE=2: leave --world out under torchrun"
    assert said[0].startswith(f"sptutor train: error: {sentence}") and said[1] == "", said
