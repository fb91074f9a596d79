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

# someone else's sequence-parallel attention: K and V all-gathered with plain torch.distributed
# (differentiable), masks from the layout's positions, autograd for the backward
YOURS = """
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from sptutor import layout as sp_layout


def {name}(q, k, v, *, causal=False, layout="contiguous", group=None, backend="auto",
           scale=None, return_lse=False):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    tokens = q.shape[1] * world
    mine = sp_layout.positions(tokens, world=world, rank=rank, layout=layout)
    every = torch.cat([sp_layout.positions(tokens, world=world, rank=r, layout=layout)
                       for r in range(world)])
    k_all = torch.cat(dist_fn.all_gather(k, group=group), dim=1)
    v_all = torch.cat(dist_fn.all_gather(v, group=group), dim=1)
    repeat = q.shape[2] // k.shape[2]
    k_all, v_all = (x.repeat_interleave(repeat, dim=2) for x in (k_all, v_all))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_all) * (scale or q.shape[-1] ** -0.5)
    if causal:
        scores = scores.masked_fill(mine[:, None] < every[None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v_all)
    return (out, lse.detach()) if return_lse else out
"""


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_every_python_block_of_the_readme_runs_and_says_what_the_readme_says(tmp_path):
    """Each block, saved as a script and run with python, exits 0; the oracle snippet reports
    'matches the oracle' on every rank for a correct implementation, as the README shows."""
    blocks = _python_blocks(README_TEXT)
    assert blocks, "README has no python block"
    for index, block in enumerate(blocks):
        script = PLACEHOLDER.sub(lambda m: YOURS.format(name=m.group(1)), block)
        path = tmp_path / f"readme_{index}.py"
        path.write_text(script)
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, f"README block {index}:\n{script}\n{done.stderr}"
        if "compare_with_oracle" in block:
            verdicts = re.findall(r"^rank (\d): matches the oracle", done.stdout, re.MULTILINE)
            assert verdicts == ["0", "1", "2", "3"], done.stdout
            shown = re.search(r"^  information: .*$", README_TEXT, re.MULTILINE).group(0)
            assert done.stdout.count(shown) == 4, (shown, done.stdout)  # the README's figures
