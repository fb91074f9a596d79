"""``check``: run your attention function over a sweep of cases in one launch, compare every
rank with the oracle, shrink to the smallest failing case and explain it.

Cases are drawn by hypothesis from a :class:`~sptutor.checker.cases.Sweep` (world sizes, token
layouts, causal or not, GQA ratios, odd head dims, dtypes, lengths) and run on a pool of W gloo
processes started once (``sptutor.launch.Pool``); a case that raises or hangs on some rank is
reported with that rank's message, and the sweep goes on in a fresh pool. Under ``torchrun``
(NCCL on GPUs, or gloo) the same call runs on the ranks torchrun started instead; there a case
that raises is reported the same way, but ends the sweep (its group cannot be restarted).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from sptutor import launch, postmortem, torchrun
from sptutor.checker import worker
from sptutor.checker.adapter import Adapter, for_sptutor
from sptutor.checker.cases import Case, Sweep, sweep_for
from sptutor.checker.compare import expect, judge
from sptutor.checker.diagnose import diagnose
from sptutor.checker.report import CaseResult, Report, reproducer

ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(Adapter))
SWEEP_FIELDS = tuple(f.name for f in dataclasses.fields(Sweep) if f.name != "worlds")
SHRINK_RUNS = 60  # at most this many runs to shrink a failure (a hang costs a timeout each)
SHRINK_BROKEN = 2  # stop shrinking after this many errors or hangs (each costs a fresh launch)


def check(
    fn: Callable,
    *,
    method: str,
    world: int = 4,
    examples: int = 20,
    seed: int | None = 0,
    cases: list[Case] | None = None,
    timeout: float = 30.0,
    enforce: tuple[str, ...] = (),
    pool: launch.Pool | None = None,
    runner=None,
    stall_timeout: float | None = None,
    **options,
) -> Report:
    """Check ``fn``, your per-rank attention function, against the oracle of ``method``.

    ``options`` are your conventions (:class:`~sptutor.checker.adapter.Adapter` fields:
    ``tensor_layout``, ``causal_keyword``, ``group_keyword``, ``layout_keyword``, ``returns``,
    ``lse_layout``, ``backward``, ``kwargs``, ``setup``, ``positions``, ``decay``,
    ``decay_keyword``) and limits on the sweep (:class:`~sptutor.checker.cases.Sweep` fields:
    ``layouts``, ``causal``, ``dtypes`` (the dtypes your code computes in; default float32),
    ``batches``, ``per_rank``, ``heads_kv``, ``gqa``, ``head_dims``, ``decays``).

    ``world``: the largest W (cases use W = 1..world, on the first W ranks; under torchrun,
    W = 1..its number of ranks, on CUDA tensors when NCCL is used: a case that raises there is
    an error like any other, and the last case run, since its group cannot be restarted; a rank
    that waits forever for one that raised is ended by ``stall_timeout`` or the group's own
    timeout); ``examples``:
    cases drawn; ``seed``: hypothesis's seed (None: a random one); ``cases``: run exactly these
    instead; ``timeout``: seconds a case may take before it counts as a hang; ``enforce``:
    "messages" and/or "saved" make message and saved-bytes differences fail (by default they
    are information); ``pool``: a running ``launch.Pool`` to use (a case that raises or hangs
    ends it, as it ends any launch; the rest of the check then runs in fresh pools of its own,
    so pass a live pool, ``pool.alive``, to the next check); ``runner``: where the cases run,
    when not on processes (an object with ``world``, ``run(case, fn, adapter)`` returning every
    member's results or a failed ``CaseResult``, and ``close()``: the exercises' grader runs
    learners' emulations in process this way); ``stall_timeout``: with processes, end a case
    whose ranks all make no progress in sptutor.comm for that many seconds, and say where each
    rank waits (code that communicates through sptutor.comm reports as it goes).
    Returns a :class:`~sptutor.checker.report.Report`; ``str(report)`` says it all.
    """
    unknown = sorted(set(options) - set(ADAPTER_FIELDS) - set(SWEEP_FIELDS))
    if unknown:
        raise TypeError(f"check() got unknown options {unknown}; adapter options are "
                        f"{ADAPTER_FIELDS}, sweep options {SWEEP_FIELDS}")  # fmt: skip
    adapter = Adapter(**{k: v for k, v in options.items() if k in ADAPTER_FIELDS})
    sweep_options = {k: v for k, v in options.items() if k in SWEEP_FIELDS}
    if adapter.positions is not None:
        sweep_options["layouts"] = ("custom",)
    takes_documents = (adapter.cu_seqlens_keyword, adapter.document_ids_keyword) != (None, None)
    if True in sweep_options.get("documents", ()) and not takes_documents:
        raise ValueError("the sweep packs documents (documents=(..., True)), but the adapter "
                         "names no cu_seqlens_keyword (or document_ids_keyword) to pass them to "
                         "your function")  # fmt: skip
    bad = sorted(set(enforce) - {"messages", "saved"})
    if bad:
        raise ValueError(f"enforce takes 'messages' and 'saved', got {bad}")
    runner = runner or _runner(world, timeout, pool, stall_timeout)
    if seed is None and isinstance(runner, _InPlace):
        seed = runner.shared_seed()  # every rank must draw the same cases
    try:
        sweep = sweep_for(method, runner.world, **sweep_options)
        session = _Session(fn, method, adapter, runner, tuple(enforce))
        if cases is not None:
            for case in cases:
                session.run(case)
        else:
            session.explore(sweep.strategy(method), examples, seed)
    finally:
        runner.close()
    return session.report(options)


@dataclasses.dataclass
class _Session:
    """The cases of one check, run once each (hypothesis may ask for one twice)."""

    fn: Callable
    method: str
    adapter: Adapter
    runner: object
    enforce: tuple[str, ...]
    results: dict = dataclasses.field(default_factory=dict)
    failing: list = dataclasses.field(default_factory=list)
    smallest_case: Case | None = None  # hypothesis's shrunk failure

    def run(self, case: Case, shrinking: bool = False) -> CaseResult:
        if case in self.results:
            return self.results[case]
        outcome = self.runner.run(case, self.fn, self.adapter)
        if isinstance(outcome, CaseResult):
            result = outcome
        else:
            expected = expect(case, self.adapter.owned(case), self.adapter.backward)
            verdicts = judge(case, expected, outcome, self.adapter.backward, self.enforce)
            status = "pass" if all(v.passed for v in verdicts) else "fail"
            result = CaseResult(case, status, verdicts)
            if status == "fail":
                result.diagnosis = diagnose(case, expected, outcome, verdicts)
        result.shrinking = shrinking
        self.results[case] = result
        if not result.passed:
            self.failing.append(result)
        return result

    def explore(self, strategy, examples: int, seed: int | None) -> None:
        """Draw ``examples`` cases; on a failure let hypothesis shrink it, within a budget."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as fixed_seed

        def probe(case: Case) -> None:
            shrinking = bool(self.failing)
            broken = sum(r.status in ("error", "hang") for r in self.failing)
            spent = sum(r.shrinking for r in self.results.values())
            first_failed = (
                next(iter(self.results.values())) is self.failing[0] if shrinking else False
            )
            # the first case drawn is the smallest there is: nothing to shrink
            hung = any(r.status == "hang" for r in self.failing)  # each costs a whole timeout
            ended = getattr(self.runner, "broken", None) is not None  # torchrun's, after an error
            out_of_budget = (first_failed or hung or ended or spent >= SHRINK_RUNS
                             or broken >= SHRINK_BROKEN)  # fmt: skip
            if case not in self.results and shrinking and out_of_budget:
                return  # out of budget: hypothesis keeps the smallest failure found so far
            if not self.run(case, shrinking).passed:
                raise _Failed(case)

        test = given(strategy)(probe)
        test = settings(max_examples=examples, database=None, deadline=None,
                        phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
                        suppress_health_check=list(HealthCheck))(test)  # fmt: skip
        if seed is not None:
            test = fixed_seed(seed)(test)
        try:
            test()
        except _Failed as failure:
            self.smallest_case = failure.case

    def report(self, options: dict) -> Report:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        results = list(self.results.values())
        smallest = None
        if self.failing:
            case = self.smallest_case
            smallest = self.results[case] if case in self.results else min(
                self.failing, key=lambda r: _size(r.case))  # fmt: skip
        script = reproducer(self.fn, self.method, smallest.case, options) if smallest else ""
        return Report(name, self.method, results, smallest, script)


class _Failed(Exception):
    """Raised inside hypothesis's test for a failing case (hypothesis shrinks on it)."""

    def __init__(self, case: Case) -> None:
        super().__init__(case.describe())
        self.case = case


def _size(case: Case) -> tuple:
    return (case.world, case.seq_len, case.heads_q, case.head_dim, case.batch)


def _runner(world: int, timeout: float, pool, stall_timeout: float | None):
    """Processes for the cases: torchrun's when this process is one of its ranks, else a
    pool of gloo processes."""
    if dist.is_initialized() or torchrun.launched():
        return _InPlace(stall_timeout)
    return _Pooled(world, timeout, pool, stall_timeout)


class _Pooled:
    """Cases on a ``launch.Pool`` of gloo ranks, restarted after a case that broke it."""

    def __init__(self, world: int, timeout: float, pool, stall_timeout: float | None) -> None:
        self.world, self.timeout, self.pool, self.own = world, timeout, pool, pool is None
        self.stall_timeout = stall_timeout
        self.progress = tempfile.mkdtemp(prefix="sptutor-progress-") if stall_timeout else None

    def run(self, case: Case, fn, adapter) -> list[dict] | CaseResult:
        if self.pool is None or not self.pool.alive:
            self.pool, self.own = launch.Pool(self.world, timeout=self.timeout), True
        watch = {"progress": (self.progress, self.stall_timeout)} if self.progress else {}
        try:
            results = self.pool.run(_task, args=(fn, adapter, case), timeout=self.timeout,
                                    **watch)  # fmt: skip
        except launch.SpawnError as error:
            text = str(error)
            hang = any(words in text for words in ("timed out", "never answered", "stalled"))
            return CaseResult(case, "hang" if hang else "error", error=text)
        return [results[rank] for rank in case.members]

    def close(self) -> None:
        if self.own and self.pool is not None:
            self.pool.close()
        if self.progress:
            shutil.rmtree(self.progress, ignore_errors=True)


def _task(rank: int, world: int, fn, adapter, case) -> dict | None:
    return worker.run_on_rank(rank, fn, adapter, case)


class _InPlace:
    """Cases on the ranks torchrun started: every rank runs the same sweep (hypothesis is
    seeded the same everywhere) and gathers every rank's results to judge them alike."""

    def __init__(self, stall_timeout: float | None = None) -> None:
        torchrun.init()
        self.world = dist.get_world_size()
        self.broken: str | None = None  # why no further case runs (a case raised)
        if stall_timeout:
            from sptutor.exercises import progress

            progress.watchdog(stall_timeout)

    def run(self, case: Case, fn, adapter) -> list[dict] | CaseResult:
        """Every rank's results, or an error CaseResult when a rank raised (each rank's outcome
        is gathered, so all ranks return the same). After an error no further case runs: the
        raising rank may have left messages in flight on the group, which cannot be restarted
        here as a pool is."""
        if self.broken is not None:
            return CaseResult(case, "error", error=f"not run: {self.broken}")
        rank = dist.get_rank()
        try:
            results = worker.run_on_rank(rank, fn, adapter, case, torchrun.device())
            mine = ("ok", time.time(), results)
        except Exception as error:  # the caller's code raised: reported like a pool's rank
            mine = (postmortem.kind_of(error), time.time(), traceback.format_exc())
            # said at once, in one line: a rank still waiting for this one may never report
            last = mine[2].strip().splitlines()[-1]
            print(f"rank {rank} raised in {case.describe()}: {last}", file=sys.stderr, flush=True)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        failure = postmortem.blame(gathered)
        if failure is not None:
            self.broken = f"an earlier case raised ({case.describe()})"
            return CaseResult(case, "error", error=failure)
        return [gathered[rank][2] for rank in case.members]

    def shared_seed(self) -> int:
        """A random seed drawn on rank 0, the same on every rank."""
        seed = [random.randrange(2**32)]
        dist.broadcast_object_list(seed, src=0)
        return seed[0]

    def close(self) -> None:
        pass


def check_sptutor(method: str, *, backend: str = "auto", **options) -> Report:
    """``check`` on sptutor's own ``<method>_attention`` (its LSE included), with uneven shards
    and packed documents in the sweep unless ``options`` say otherwise."""
    import sptutor

    adapter = dataclasses.asdict(for_sptutor(method, backend))
    sizes = {"uneven": (False, True), "documents": (False, True)}
    return check(getattr(sptutor, f"{method}_attention"), method=method,
                 **(adapter | sizes | options))  # fmt: skip
