"""``sptutor tour``: the facts every sequence-parallel method rests on, measured and printed.

``measure`` measures one row per case (``*_rows``: the tests hold each to its claim); ``tables``
folds them into the shorter tables :func:`run` prints, each under a two-line introduction and
above its legend (the prose is in this file).
"""

from __future__ import annotations

import sys
import textwrap
import time

from sptutor import console
from sptutor.tour.measure import REAL_WORLD, cost_rows, merge_rows, oracle_rows, real_rows
from sptutor.tour.tables import merge_table, oracle_table, real_table, summarize

__all__ = ["cost_rows", "merge_rows", "merge_table", "oracle_rows",
           "oracle_table", "real_rows", "real_table", "run", "summarize"]  # fmt: skip

OPENING = """\
sptutor tour: sequence parallelism for attention, measured

sptutor teaches sequence parallelism: how long-context training splits one sequence over W
processes ("ranks"), each holding S/W of its tokens. Seven methods are each written twice, as a
single-process oracle that emulates all W ranks and as real torch.distributed code: rsa, ring,
ulysses, usp (Ulysses inside a ring) and lss for softmax attention, lasp and lasp2 for linear
attention. On small float64 inputs the tour checks that each method is exact, counts the bytes
it sends and keeps for backward and how evenly it shares the work, then prices it at a realistic
size. Four sections, 5 to 20 seconds on two CPU cores; no GPU needed."""

ERR = "relative error ‖a−b‖/‖b‖"
# number: (title, two lines of what the section shows and why it matters, legend of its columns)
SECTIONS = {
    1: ("Splitting the keys over ranks loses nothing",
        ("Each rank attends to its own block of keys; merging the partial outputs by their",
         "log-sum-exp (LSE) gives full attention back exactly. The softmax methods rest on it."),
        [("layout", "which tokens a rank holds: contiguous = one block of S/W, zigzag = chunks r"
          " and 2W-1-r of 2W (balances causal work), striped = tokens r, r+W, r+2W, ..."),
         ("cases", "W = 2, 4, 8 ranks, causal and not (B=2, S=48, Hq=4, Hkv=2, D=16, float64)"),
         ("out err, lse err", f"largest {ERR} of the merged output and LSE against full"
          " attention, over the cases; float64 rounding is about 1e-16")]),
    2: ("Each method's oracle is exact, and what it sends is a formula",
        ("The oracle emulates W=4 ranks in one process and logs every message in a ledger. It",
         "must equal full attention, and its bytes the closed forms that section 4 prices."),
        [("method", "usp u=2 = Ulysses over 2 ranks inside a ring of 2 (B=1, S=32, Hq=4, Hkv=2,"
          " D=16, float64)"),
         ("causal", "yes = each token sees only earlier ones (lasp, lasp2 also decay per head)"),
         ("err", f"largest {ERR} of out, LSE, dq, dk, dv against full attention and autograd,"
          " over the layouts"),
         ("fwd B, bwd B, saved B", "bytes (B) the busiest rank sends in forward, sends in"
          " backward, keeps for backward; the same under every layout"),
         ("= formula", "yes when every rank's sent and kept bytes equal the closed form of"
          " sptutor.cost exactly, under every layout"),
         ("contiguous, zigzag, striped", "work max/min under that layout: useful multiply-adds"
          " of the busiest rank over the idlest, 1.00 = balanced; - = not run (linear methods"
          " are contiguous only)")]),
    3: (f"The real code on {REAL_WORLD} processes equals its oracle",
        ("The same methods as real torch.distributed code, against the oracle on the same inputs:",
         "outputs, gradients, every message, every byte kept. sptutor.testing does it for yours."),
        [("method", "as in section 2; usp runs on a 2 x 2 mesh of the 4 processes"),
         ("runs", "layout x causal cases, all in one launch (B=1, S=32, Hq=4, Hkv=2, D=16)"),
         ("err", f"largest {ERR} of out, LSE, dq, dk, dv against the oracle, on any rank"),
         ("ledger", "match = every rank sent exactly the oracle's messages, in order (operation,"
          " peer, bytes, phase, step)"),
         ("saved B", "bytes (B) autograd keeps for backward on the busiest rank (saved-tensor"
          " hooks)"),
         ("= oracle", "yes when every rank keeps exactly the bytes the oracle counts")]),
    4: ("At a realistic size: what a rank sends and keeps",
        ("The closed forms checked above, for a Llama-3-8B-like attention layer: RSA keeps S²/W",
         "scores, LSS all of K and V, ring/Ulysses/USP O(S/W) bytes; LASP sends D×D states only."),
        [("method", "u = the Ulysses degree of the USP mesh, W/2"),
         ("S, W", "tokens in the sequence, ranks (B=1, Hq=32, Hkv=8, D=128, bfloat16, causal)"),
         ("sent MiB/rank", "bytes sent forward + backward (each phase's busiest rank), in MiB"
          " (2^20 bytes)"),
         ("saved MiB/rank", "bytes the busiest rank keeps for backward, in MiB")]),
}  # fmt: skip

# the command that draws what each section measures
PICTURES = {
    1: "sptutor trace ring --layout zigzag --causal --out ring.png (who computes which block)",
    2: "sptutor bench balance --out . (useful work per rank and layout, as bars)",
    3: "sptutor trace usp --ulysses 2 --causal (every rank's messages, step by step)",
    4: "sptutor bench comm --out . and sptutor bench memory --out . (bytes against W and S)",
}

CLOSING = """\
Where to go next
   mkdocs serve        the docs site, from the repository root: start with the pages Concepts,
                       Design, and Oracle and real code side by side
   sptutor train --method ring --world 4
                       train a tiny GPT with ring attention on 4 CPU processes; every option
                       (methods, layouts, sizes) is in 'sptutor train --help'
   sptutor trace METHOD
                       one emulated call as a table of every rank's steps, or a picture (--out)
   sptutor bench comm | memory | balance | time
                       bytes, saved memory and balance against the closed forms and the papers,
                       and wall time on 1-4 processes (--out DIR writes JSON and PNG)
   sptutor.testing     check your own attention code against the oracle: the README section
                       "Check your own implementation" has the whole script"""


def _heading(number: int) -> None:
    """A section's title and its two lines of what it shows and why that matters."""
    title, intro, _ = SECTIONS[number]
    print(f"\n{number}. {title}\n" + "".join(f"   {line}\n" for line in intro), flush=True)


def _table(number: int, rows: list[dict]) -> None:
    """The table (rich on a terminal, aligned text otherwise; floats as 1.0e-16), then its
    legend: one "names: meaning" entry per column, wrapped to 96, then the picture to look at."""
    columns = list(rows[0])
    cells = [[f"{row[c]:.1e}" if isinstance(row[c], float) else row[c] for c in columns]
             for row in rows]  # fmt: skip
    console.table(cells, columns)
    print()
    for names, meaning in SECTIONS[number][2]:
        print(textwrap.fill(f"{names}: {meaning}", 96, initial_indent="   ",
                            subsequent_indent="     ", break_on_hyphens=False))  # fmt: skip
    print(f"   see it: {PICTURES[number]}")
    sys.stdout.flush()


def run() -> None:
    """Print the tour: an opening, four measured sections with legends, where to go next."""
    started = time.perf_counter()
    print(OPENING)
    _heading(1)
    _table(1, merge_table(merge_rows()))
    _heading(2)
    _table(2, oracle_table(oracle_rows()))
    _heading(3)
    print(f"   starting {REAL_WORLD} gloo processes (a few seconds)...", flush=True)
    launched = time.perf_counter()
    rows = real_rows()
    print(f"   done in {time.perf_counter() - launched:.1f} s\n", flush=True)
    _table(3, real_table(rows))
    _heading(4)
    _table(4, cost_rows())
    print(f"\n{CLOSING}\n\nThe tour took {time.perf_counter() - started:.1f} s.")
