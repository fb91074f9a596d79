"""Planted mistakes, one line changed in a method's solution, and what the grader says of each:
the catalogue the grader's tests hold to the right category, and the sample reports of the
docs page Exercises.

    python scripts/grade_samples.py --out docs/generated/grades.md

CI runs this before building the docs, so the page shows what the grader really prints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MERGE = "out, lse = blocks.merge(out, lse, block_out, block_lse)"
VISIBLE = "        if visible[src]:"
SHIFT = (
    '        dkv_shift = comm.ring_shift(dkv_from_prev_rank, group, phase="backward", step=step,\n'
    "                                    receive_tokens=incoming)  # fmt: skip\n"
)
HOP = SHIFT + (
    "        if step < W - 1:\n"
    "            kv_from_prev_rank = shift.wait()\n"
    "    dkv_from_prev_rank = dkv_shift.wait()\n"
)
SHORT = (  # the accumulators' last hop (home) left out
    "        if step < W - 1:\n"
    + "".join("    " + line + "\n" for line in SHIFT.splitlines())
    + "            kv_from_prev_rank = shift.wait()\n"
)
SPLIT = "    return padding.join(received, sizes)  # (B, S, H/U, D)"
CARRY = "kv_out = chunks.carry(kv_through, local_state, decay, chunk)"
PREFIX = "state_in = chunks.decayed_sum(gathered[before], decay, chain.lengths[before])"
RING_CALL = "q_heads, k_heads, v_heads, ring_positions, ring_documents, visible, causal, scale,"

# (mistake, method, (old, new, how many times old appears), category, words of the sentence)
MISTAKES = [
    ("swapped peer", "ring",
     ("src = (rank - step) % W  # whose", "src = (rank + step) % W  # whose", 1),
     "wrong peer", "masked"),
    ("missing LSE rescale", "ring", (MERGE, "out, lse = block_out, block_lse", 1),
     "a missing or wrong merge", "the LSE rescale is missing"),
    ("diagonal block masked", "ring",
     (VISIBLE, VISIBLE.replace("if ", "if src != rank and "), 3),
     "a missing or wrong merge", "own block (the diagonal one) is missing"),
    ("dropped homecoming hop", "ring",
     (HOP, SHORT, 1),
     "a block's gradient sent to the wrong rank", "stopped a hop short of home"),
    ("source of a step the wrong way round", "rsa",
     ("src = (rank - step) % W  # whose", "src = (rank + step) % W  # whose", 1),
     "wrong numbers", "wrong"),
    ("wrong all-to-all split", "ulysses",
     (SPLIT, SPLIT.replace("received,", "received[::-1],"), 1),
     "a wrong all-to-all split", "it is rank 1's out"),
    ("the ring's causal mask dropped", "usp",
     (RING_CALL, RING_CALL.replace("causal,", "False,"), 1),
     "a wrong mask", "the causal flag"),
    ("missing LSE rescale", "lss", (MERGE, "out, lse = block_out, block_lse", 1),
     "a missing or wrong merge", "the LSE rescale is missing"),
    ("state carried without decay", "lasp", (CARRY, CARRY.replace("decay,", "None,"), 1),
     "a state carried wrongly", "without its decay"),
    ("prefix summed without decay", "lasp2", (PREFIX, PREFIX.replace("decay,", "None,"), 1),
     "a state carried wrongly", "without its decay"),
]  # fmt: skip


def planted(method: str, old: str, new: str, count: int) -> str:
    """The solution ``sptutor/<method>.py`` with the mistake planted (``old`` must appear
    ``count`` times: a changed solution fails loudly here, not silently)."""
    source = (ROOT / "sptutor" / f"{method}.py").read_text()
    if source.count(old) != count:
        raise ValueError(f"{method}: expected {count} x {old!r}, found {source.count(old)}")
    return source.replace(old, new)


def main() -> None:
    from sptutor import launch
    from sptutor.exercises.grade import grade

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as folder, launch.Pool(4, timeout=120.0) as pool:
        seen = set()
        for mistake, method, patch, _, _ in MISTAKES:
            if method in seen:
                continue  # one per method on the page
            seen.add(method)
            path = Path(folder) / method / f"{method}.py"
            path.parent.mkdir()
            path.write_text(planted(method, *patch))
            graded = grade(path, examples=20, pool=pool if pool.alive else None)
            print(f"{method}: {graded.category}", flush=True)
            table = str(graded).rsplit("\n", 1)[0]  # the last line is the sentence below
            lines += [f"### {method}: {mistake}", "", f"**{graded.category}**: {graded.sentence}",
                      "", "```text", table, "```", ""]  # fmt: skip
    text = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
