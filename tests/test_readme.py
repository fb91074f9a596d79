"""README's python blocks run as a newcomer would run them (saved to a file, ``python file.py``),
so the README cannot drift from the code. A placeholder import of "your" implementation is filled
with a small correct one written with plain torch.distributed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_TEXT = (ROOT / "README.md").read_text()
PLACEHOLDER = re.compile(r"^from my_project import (\w+).*$", re.MULTILINE)

# someone else's ring attention, as README describes it: (B, H, S/W, D) contiguous shards, its
# own keywords; K and V all-gathered with plain torch.distributed in a small autograd Function
# (torch.distributed.nn.functional.all_gather is not used: on gloo, torch 2.13, its backward gives
# wrong gradients when the incoming gradient is not contiguous, which sptutor's check found)
YOURS = """
import torch
import torch.distributed as dist


class _Gather(torch.autograd.Function):  # all-gather along S; its backward reduce-scatters
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg, world = pg, dist.get_world_size(pg)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # ranks stacked along B
        dist.all_gather_into_tensor(out, x.contiguous(), group=pg)
        return torch.cat(out.chunk(world, dim=0), dim=2)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.pg)
        parts = torch.cat(grad.chunk(world, dim=2), dim=0).contiguous()
        mine = parts.new_empty((parts.shape[0] // world, *parts.shape[1:]))
        dist.reduce_scatter_tensor(mine, parts, group=ctx.pg)
        return mine, None


def {name}(q, k, v, is_causal=False, pg=None):
    rank, local = dist.get_rank(pg), q.shape[2]
    mine = torch.arange(rank * local, (rank + 1) * local)
    k_all, v_all = _Gather.apply(k, pg), _Gather.apply(v, pg)
    every = torch.arange(k_all.shape[2])
    repeat = q.shape[1] // k.shape[1]
    k_all, v_all = (x.repeat_interleave(repeat, dim=1) for x in (k_all, v_all))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k_all) * q.shape[-1] ** -0.5
    if is_causal:
        scores = scores.masked_fill(mine[:, None] < every[None, :], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v_all)
"""


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_every_python_block_of_the_readme_runs_and_says_what_the_readme_says(tmp_path):
    """Each block, saved as a script and run with python, exits 0; the check snippet reports
    the verdict the README shows for a correct implementation."""
    blocks = _python_blocks(README_TEXT)
    assert blocks, "README has no python block"
    for index, block in enumerate(blocks):
        script = PLACEHOLDER.sub(lambda m: YOURS.format(name=m.group(1)), block)
        path = tmp_path / f"readme_{index}.py"
        path.write_text(script)
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, f"README block {index}:\n{script}\n{done.stderr}"
        if "check(" in block:
            shown = re.search(r"^my_ring matches the ring oracle in all \d+ cases$", README_TEXT,
                              re.MULTILINE)  # fmt: skip
            assert shown and shown.group(0) in done.stdout.splitlines(), done.stdout


def test_the_readmes_check_command_line_passes_the_same_ring(tmp_path):
    """The README's ``sptutor check my_project:my_ring ...`` line, run as shown in a folder that
    holds my_project.py (the same correct ring as above): exit 0 and the same verdict."""
    joined = README_TEXT.replace("\\\n", " ")  # a command continued with a backslash
    found = re.search(r"^sptutor check my_project:my_ring .*$", joined, re.MULTILINE)
    assert found, "README shows no sptutor check command line for my_ring"
    (tmp_path / "my_project.py").write_text(YOURS.format(name="my_ring"))
    argv = found.group(0).split()[1:]
    done = subprocess.run([sys.executable, "-m", "sptutor", *argv], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "my_ring matches the ring oracle in all 20 cases" in done.stdout, done.stdout
    # without its keyword flags the function refuses check's causal=: the report says which flag
    plain = [a for a in argv if a not in ("--causal-keyword", "is_causal", "--group-keyword", "pg")]
    done = subprocess.run([sys.executable, "-m", "sptutor", *plain], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "check() passes causal= because causal_keyword='causal'" in done.stdout, done.stdout
    assert "(--causal-keyword on the command line)" in done.stdout, done.stdout


def test_every_readme_section_the_library_names_exists():
    """Text that sends a reader to 'the README section "X"' (the tour, help texts) names a
    heading the README has."""
    headings = set(re.findall(r"^#+ (.+)$", README_TEXT, re.MULTILINE))
    sources = "\n".join(path.read_text() for path in (ROOT / "sptutor").rglob("*.py"))
    named = re.findall(r'README section\s+"([^"]+)"', sources)
    assert named, "no README section named in the library (the pattern is stale)"
    assert set(named) <= headings, set(named) - headings
