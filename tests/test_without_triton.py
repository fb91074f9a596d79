"""Without the optional triton package (the ``kernels`` extra) the oracle and the real code run on
torch (``backend="auto"`` is torch's fused CPU kernel on CPU tensors), and asking for
``backend="triton"`` names the extra to install."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.util
    import torch
    import sptutor
    from sptutor import backends, launch, layout, oracle

    assert importlib.util.find_spec("triton") is None, "triton is not hidden"

    def body(rank, world, q):
        shard = layout.shard(q, world=world, layout="zigzag")[rank]
        return sptutor.ring_attention(shard, shard, shard, causal=True, layout="zigzag")

    if __name__ == "__main__":
        q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
        shards = launch.spawn(body, 2, (q,))
        expected = oracle.simulate("ring", q, q, q, world=2, causal=True, layout="zigzag").out
        error = (layout.unshard(shards, layout="zigzag") - expected).abs().max().item()
        assert error < 1e-12, error
        assert backends.resolve("auto", q) == "fused"
        try:
            backends.resolve("triton", q)
        except ValueError as missing:
            print(missing)
    """
)


def test_the_library_runs_without_triton_and_names_the_extra(tmp_path):
    """triton hidden from every process (a sitecustomize that blocks its import): a real ring on
    2 processes (backend "auto": "fused") equals the oracle, and backend='triton' says to install
    sptutor[kernels]."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None\n")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 'pip install "sptutor[kernels]"' in done.stdout
