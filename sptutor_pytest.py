"""sptutor's pytest plugin: the ``sp_oracle`` fixture checks your sequence-parallel attention
against sptutor's oracle, with the whole report as the failure message::

    def test_my_ring(sp_oracle):
        sp_oracle.check(my_ring, method="ring")

pytest loads this module in every run where sptutor is installed (entry point ``pytest11``), so
it imports nothing heavy: torch and sptutor load only when a test uses the fixture. The processes
a check needs start once per world size and serve every test of the session.
"""

from __future__ import annotations

import pytest


class SpOracle:
    """What the ``sp_oracle`` fixture gives a test: :meth:`check`, on pools kept per W."""

    def __init__(self) -> None:
        self._pools: dict[int, object] = {}

    def check(self, fn, *, method: str, world: int = 4, timeout: float = 30.0, **options):
        """``sptutor.testing.check`` on a pool kept for the session; fails the test with the
        report when a case fails, else returns the report."""
        from sptutor import launch
        from sptutor.checker import check

        pool = self._pools.get(world)
        if pool is None or not pool.alive:
            pool = self._pools[world] = launch.Pool(world, timeout=timeout)
        report = check(fn, method=method, world=world, timeout=timeout, pool=pool, **options)
        if not report.passed:
            pytest.fail(str(report), pytrace=False)
        return report

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@pytest.fixture(scope="session")
def sp_oracle():
    """Check a per-rank attention function against sptutor's oracle:
    ``sp_oracle.check(fn, method="ring", **options)`` (options as ``sptutor.testing.check``)."""
    oracle = SpOracle()
    yield oracle
    oracle.close()
