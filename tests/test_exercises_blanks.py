"""The exercises are the solutions with their marked regions blanked: the stored blanks are up to
date, each compiles and imports, each region is a TODO with its size that raises when reached, a
bad marker is an error naming its file and line, and ``copy`` never overwrites work by accident."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sptutor import exercises, layout
from sptutor.exercises import command, generate, markers
from sptutor.exercises.markers import MarkerError
from sptutor.methods import LINEAR_METHODS, METHODS
from sptutor.oracle.world import World

ROOT = Path(__file__).resolve().parents[1]


def _solution(name: str) -> str:
    return (ROOT / exercises.solution_of(name)).read_text(encoding="utf-8")


def _load(text: str, module_name: str, folder: Path):
    """Import ``text`` from a file in ``folder``, as the grader imports a learner's file."""
    path = folder / f"{module_name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group in this process (an in-memory store): the real code's world."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _inputs():
    """q, dout: (B, S, Hq, D) = (1, 8, 2, 4); k, v: (1, 8, 1, 4) (GQA); seeded."""
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 8, 2, 4, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 8, 1, 4, generator=gen) for _ in range(2))
    return q, k, v, dout


def _run_emulated(module, method: str) -> None:
    """The file's ``emulate`` on an emulated world of 2 ranks, forward and backward, causal."""
    world, ulysses = 2, 2 if method == "usp" else 1
    q, k, v, dout = _inputs()
    positions = layout.all_positions(q.shape[1], world=world, ulysses=ulysses)
    options = {"positions": positions, "documents": [None] * world, "causal": True}
    options |= {"decay": None} if method in LINEAR_METHODS else {"scale": q.shape[-1] ** -0.5}
    options |= {"ulysses": ulysses} if method == "usp" else {}
    shards = [layout.shard_by(x, positions) for x in (q, k, v, dout)]
    module.emulate(World(list(range(world))), *shards, **options)


def _run_real(module, method: str) -> None:
    """The file's ``<method>_attention`` on the one-rank group, forward and backward, causal."""
    from sptutor.mesh import make_usp_mesh

    q, k, v, dout = _inputs()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    options = {"mesh": make_usp_mesh(1, 1)} if method == "usp" else {}
    getattr(module, f"{method}_attention")(q, k, v, causal=True, **options).backward(dout)


def _run_blocks(module) -> None:
    """The file's ``merge``, then its ``attention_block_backward``, on one block of 8 keys."""
    from sptutor import blocks

    q, k, v, dout = _inputs()
    pos = torch.arange(q.shape[1])
    out, lse = blocks.attention_block(q, k, v, pos, pos, True, 0.5)
    module.merge(out, lse, out, lse)
    module.attention_block_backward(dout, q, k, v, out, lse, pos, pos, True, 0.5)


def _run(module, name: str) -> None:
    if name == "blocks":
        _run_blocks(module)
    elif name.startswith("oracle_"):
        _run_emulated(module, name.removeprefix("oracle_"))
    else:
        _run_real(module, name)


def _regions_by_hand(text: str) -> list[tuple[str, str, int]]:
    """(name, description, non-empty lines) of each region, read without the generator."""
    found, start = [], None
    for index, line in enumerate(text.splitlines()):
        if line.strip().startswith("# BEGIN SOLUTION "):
            start = index, line.strip().removeprefix("# BEGIN SOLUTION ").split(": ", 1)
        elif line.strip() == "# END SOLUTION":
            body = text.splitlines()[start[0] + 1 : index]
            found.append((*start[1], sum(1 for body_line in body if body_line.strip())))
    return found


def test_stored_blanks_match_their_solutions(capsys):
    """`python -m sptutor.exercises.generate --check` passes: no blank is stale or hand-edited."""
    assert generate.main(["--check"]) == 0, capsys.readouterr().out[-4000:]


def test_every_method_file_has_regions_forward_and_backward():
    """Each method's real and emulated files mark 2-4 regions, with the same names on both."""
    for method in METHODS:
        real, emulated = (_regions_by_hand(_solution(n)) for n in (method, f"oracle_{method}"))
        assert 2 <= len(real) <= 4, (method, real)
        assert [r[:2] for r in real] == [r[:2] for r in emulated], method


@pytest.mark.parametrize("name", exercises.NAMES)
def test_every_blank_compiles_imports_and_stops_at_its_first_todo(name, tmp_path, one_rank):
    """A blank is valid Python, imports from the learner's folder (sptutor is installed), and
    run forward and backward it raises its first region's TODO."""
    text = exercises.blank(name)
    compile(text, f"{name}.py", "exec")
    module = _load(text, f"exercise_{name}", tmp_path)
    assert f"generated from {exercises.solution_of(name)}" in text  # the grader reads this
    first = exercises.todos(name)[0].name
    with pytest.raises(NotImplementedError, match=rf"^TODO\({re.escape(first)}\): "):
        _run(module, name)


@pytest.mark.parametrize("name", exercises.NAMES)
def test_every_region_is_a_todo_with_its_size(name):
    """Each region of the solution is, in order, a TODO comment, its size and a raise; no
    solution line of a region is left in the blank."""
    text, expected = exercises.blank(name), _regions_by_hand(_solution(name))
    assert exercises.todos(name) == [exercises.Todo(*region) for region in expected]
    stripped = [line.strip() for line in text.splitlines()]
    for region_name, description, lines in expected:
        todo = f"TODO({region_name}): {description}"
        size = f"(the solution is {lines} line{'' if lines == 1 else 's'})"
        at = stripped.index(f"# {todo}")
        assert stripped[at + 1 : at + 3] == [f"# {size}", f'raise NotImplementedError("{todo}")']
    assert "# BEGIN SOLUTION" not in text and "# END SOLUTION" not in text


@pytest.mark.parametrize("name", exercises.NAMES)
def test_every_region_raises_its_todo_when_reached(name, tmp_path, one_rank):
    """With only one region blanked (the others solved), running the file reaches that region
    and raises NotImplementedError("TODO(<region>): ..."): every region is on the path taken."""
    text = _solution(name)
    for index, region in enumerate(markers.parse(text, exercises.solution_of(name))):
        module = _load(markers.blank(text, [region]), f"partial_{name}_{index}", tmp_path)
        with pytest.raises(NotImplementedError, match=rf"^TODO\({re.escape(region.name)}\): "):
            _run(module, name)


def test_the_solutions_themselves_run(tmp_path, one_rank):
    """Blanking nothing leaves the solution: every file runs through (so the raises above are
    the regions', not the harness's)."""
    for name in exercises.NAMES:
        _run(_load(markers.blank(_solution(name), []), f"solved_{name}", tmp_path), name)


GOOD = """def f(x):
    y = x
    # BEGIN SOLUTION first: double it
    y = 2 * x
    # END SOLUTION
    return y
"""
BAD = {  # source -> the line the error must name, and words it must say
    "unbalanced begin": ("def f(x):\n    # BEGIN SOLUTION a: b\n    return x\n", 2, "no END"),
    "unbalanced end": ("def f(x):\n    return x\n    # END SOLUTION\n", 3, "no BEGIN"),
    "nested": ("def f(x):\n    # BEGIN SOLUTION a: b\n    # BEGIN SOLUTION c: d\n    y = x\n"
               "    # END SOLUTION\n    # END SOLUTION\n", 3, "do not nest"),
    "duplicate": (GOOD + GOOD.replace("def f", "def g"), 9, "already the region at line 3"),
    "no label": ("def f(x):\n    # BEGIN SOLUTION double it\n    y = x\n    # END SOLUTION\n",
                 2, "<region name>: <what to write>"),
    "module level": ("# BEGIN SOLUTION a: b\nx = 1\n# END SOLUTION\n", 1, "module level"),
    "half a statement": ("def f(x):\n    y = max(\n    # BEGIN SOLUTION a: b\n        x, 1\n"
                         "    # END SOLUTION\n    )\n    return y\n", 3, "indentation"),
    "an if without its body": ("def f(x):\n    # BEGIN SOLUTION a: b\n    if x:\n"
                               "    # END SOLUTION\n        x = 1\n    return x\n", 2,
                               "does not compile"),
    "end indented apart": ("def f(x):\n    # BEGIN SOLUTION a: b\n    y = x\n"
                           "        # END SOLUTION\n    return y\n", 4, "indented like"),
    "empty": ("def f(x):\n    # BEGIN SOLUTION a: b\n\n    # END SOLUTION\n    return x\n", 2,
              "empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_bad_marker_is_an_error_naming_file_and_line(case, tmp_path):
    """Unbalanced, nested, duplicate, unlabelled, module-level or non-compiling regions are
    MarkerErrors whose message starts with ``file:line:``."""
    source, line, words = BAD[case]
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(MarkerError) as error:
        markers.parse(path.read_text(), str(path))
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)
    assert words in str(error.value)


def test_a_good_region_blanks_to_valid_python():
    """The blank of a one-line region is its TODO, its size (1 line, singular) and the raise."""
    regions = markers.parse(GOOD, "good.py")
    assert [(r.name, r.description, r.begin, r.end, r.lines) for r in regions] == [
        ("first", "double it", 3, 5, 1)
    ]
    blanked = markers.blank(GOOD, regions)
    assert blanked == GOOD.replace(
        "    # BEGIN SOLUTION first: double it\n    y = 2 * x\n    # END SOLUTION\n",
        '    # TODO(first): double it\n    # (the solution is 1 line)\n'
        '    raise NotImplementedError("TODO(first): double it")\n',
    )  # fmt: skip
    namespace = {}
    exec(compile(blanked, "good.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"^TODO\(first\): double it$"):
        namespace["f"](1)


def test_check_reports_a_stale_blank_with_a_diff(tmp_path, monkeypatch, capsys):
    """A hand-edited, a missing or an extra stored blank makes --check exit 1 with a diff."""
    fresh = generate.render_all()
    generate.write(fresh, tmp_path)
    assert generate.differences(fresh, tmp_path) == []
    edited = tmp_path / "ring.py.txt"
    edited.write_text(edited.read_text().replace("TODO(ring forward)", "TODO(mine)"))
    (tmp_path / "lss.py.txt").unlink()
    (tmp_path / "old.py.txt").write_text("x = 1\n")
    monkeypatch.setattr(generate, "BLANKS", tmp_path)
    assert generate.main(["--check"]) == 1
    out = capsys.readouterr().out
    for file in ("ring.py.txt", "lss.py.txt", "old.py.txt"):
        assert f"{tmp_path.name}/{file} (stored)" in out, file
    assert "-    # TODO(mine)" in out and "+    # TODO(ring forward)" in out
    assert generate.main([]) == 0  # regenerating makes it whole again
    assert generate.differences(fresh, tmp_path) == []


def test_a_marker_error_stops_the_generator(monkeypatch, capsys):
    """The generator exits 2 and prints the marker's file and line; it writes nothing."""

    def broken():
        raise MarkerError("sptutor/ring.py:12: region 'ring forward' has no END SOLUTION")

    monkeypatch.setattr(generate, "render_all", broken)
    assert generate.main(["--check"]) == 2
    assert "sptutor/ring.py:12: region 'ring forward'" in capsys.readouterr().err


def test_copy_writes_the_exercise_and_keeps_existing_work(tmp_path):
    """``copy`` writes <dir>/<name>.py, refuses to overwrite it unless ``force``, and names the
    exercises when asked for one that does not exist."""
    path = exercises.copy("ring", tmp_path / "mine")
    assert path == tmp_path / "mine" / "ring.py"
    assert path.read_text() == exercises.blank("ring")
    path.write_text("my work\n")
    with pytest.raises(FileExistsError, match="already exists"):
        exercises.copy("ring", tmp_path / "mine")
    assert path.read_text() == "my work\n"
    assert exercises.copy("ring", tmp_path / "mine", force=True).read_text().startswith("# sptutor")
    with pytest.raises(ValueError, match="oracle_ring"):
        exercises.copy("rung", tmp_path)


def test_the_exercise_command_lists_copies_and_refuses(tmp_path, capsys):
    """``sptutor exercise --list`` names every exercise and TODO; ``sptutor exercise ring``
    copies, and a second copy exits 2 with the reason."""
    parser = argparse.ArgumentParser(prog="sptutor")
    sub = command.add_parser(parser.add_subparsers(dest="command"))
    assert command.run(parser.parse_args(["exercise", "--list"]), sub) == 0
    listing = capsys.readouterr().out
    for name in exercises.NAMES:
        assert f"{name}  (from {exercises.solution_of(name)})" in listing
        assert all(f"TODO({todo.name})" in listing for todo in exercises.todos(name))
    args = parser.parse_args(["exercise", "oracle_lasp", "--dir", str(tmp_path)])
    assert command.run(args, sub) == 0
    assert "sptutor grade" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        command.run(args, sub)
    assert stopped.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_the_exercises_pages_todo_excerpt_is_the_blanks_own():
    """docs/exercises.md quotes the ring forward TODO with its size: those lines are the
    generated blank's, so the size it states cannot drift from the solution."""
    page = (ROOT / "docs" / "exercises.md").read_text()
    excerpt = re.search(r"^( +# TODO\(ring forward\).*\n +# \(the solution is \d+ lines\))$", page,
                        re.MULTILINE)  # fmt: skip
    assert excerpt, "the page's ring forward TODO excerpt is gone"
    blank = (ROOT / "sptutor" / "exercises" / "blanks" / "ring.py.txt").read_text()
    lines = [line.strip() for line in excerpt.group(1).splitlines()]
    assert "\n".join(lines) in "\n".join(line.strip() for line in blank.splitlines())
