"""The checker's other doors: the pytest plugin's ``sp_oracle`` fixture (the report is the
failure message; loading the plugin imports neither torch nor sptutor) and ``sptutor check``."""

import subprocess
import sys
import textwrap

pytest_plugins = ("pytester",)

TEST_FILE = textwrap.dedent(
    """
    import sptutor


    def doubled(q, k, v, *, causal, group, layout):
        return 2 * sptutor.ring_attention(q, k, v, causal=causal, group=group, layout=layout)


    def test_sptutor_ring_passes(sp_oracle):
        report = sp_oracle.check(sptutor.ring_attention, method="ring", world=2, examples=4,
                                 layout_keyword="layout")
        assert report.passed


    def test_a_doubled_output_fails_with_the_report(sp_oracle):
        sp_oracle.check(doubled, method="ring", world=2, examples=4, layout_keyword="layout")
    """
)


def test_the_fixture_reports_a_failure_as_its_message(pytester):
    pytester.makepyfile(test_theirs=TEST_FILE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "doubled FAILS the ring oracle" in text
    assert "it is 2 times the right value" in text
    assert "smallest failing case: ring W=1" in text


def test_loading_the_plugin_imports_neither_torch_nor_sptutor(tmp_path):
    probe = textwrap.dedent(
        """
        import sys, pytest

        class Probe:
            def pytest_collection_finish(self, session):
                heavy = sorted(m for m in ("torch", "sptutor") if m in sys.modules)
                print("HEAVY", heavy)

        pytest.main(["--co", "-q", "-p", "no:cacheprovider", sys.argv[1]], plugins=[Probe()])
        """
    )
    (tmp_path / "test_nothing.py").write_text("def test_x():\n    pass\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
    assert "sp_oracle" in subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-q", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    ).stdout  # fmt: skip


def test_sptutor_check_on_the_command_line(tmp_path):
    (tmp_path / "theirs.py").write_text(textwrap.dedent(TEST_FILE).split("def test_")[0])
    command = [sys.executable, "-m", "sptutor", "check", "theirs:doubled", "--method", "ring",
               "--world", "2", "--examples", "3", "--layout-keyword", "layout"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "doubled FAILS the ring oracle" in done.stdout
    assert "reproduce it with this script" in done.stdout
    done = subprocess.run([*command[:4], "theirs:missing", *command[5:]], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "has no attribute 'missing'" in done.stderr
