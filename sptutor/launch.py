"""``spawn``: run a function on W gloo processes from a script, a test or a notebook.

The function and its arguments travel to the children by value (cloudpickle), so a function
defined in a notebook cell or inside a test works. Rendezvous goes through a file, so no TCP port
is fixed or guessed. If any rank raises, the others are ended within seconds and the caller gets
that rank's traceback; process groups are created with a timeout, so nothing hangs forever.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import cloudpickle

ERROR_GRACE_S = 2.0  # after a first error, how long to wait for the ranks it made fail


class SpawnError(RuntimeError):
    """A rank of :func:`spawn` failed; the message holds that rank's traceback."""


def _child(rank: int, world: int, payload: bytes, init_file: str, conn, timeout_s: float) -> None:
    """Body of one child process: join the group, run the function, send back result or error."""
    import torch
    import torch.distributed as dist

    from sptutor import comm

    torch.set_num_threads(1)  # W processes share a few cores: no oversubscription
    try:
        fn, args = cloudpickle.loads(payload)
        comm.set_group_timeout(timedelta(seconds=timeout_s))  # sub-groups too (comm.new_group)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        result = fn(rank, world, *args)
        conn.send(("ok", time.time(), pickle.dumps(result)))
    except BaseException:
        conn.send(("error", time.time(), traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _end(processes: list) -> None:
    """Terminate every child still running, then kill the ones that ignore it."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 3
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def spawn(
    fn: Callable[..., Any], world: int, args: tuple = (), *, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo processes; return their results.

    ``results[r]`` is what rank r returned (it must pickle). Raises :class:`SpawnError` with the
    first failing rank's traceback (the other ranks are ended), or when ``timeout`` seconds pass.
    """
    if world < 1:
        raise ValueError(f"spawn needs world >= 1, got world={world}")
    context = multiprocessing.get_context("spawn")
    payload = cloudpickle.dumps((fn, args))
    with tempfile.TemporaryDirectory(prefix="sptutor-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        pipes = [context.Pipe(duplex=False) for _ in range(world)]
        processes = [
            context.Process(
                target=_child, args=(r, world, payload, init_file, pipes[r][1], timeout)
            )
            for r in range(world)
        ]
        for process in processes:
            process.start()
        try:
            return _collect(processes, [reader for reader, _ in pipes], timeout)
        finally:
            _end(processes)


def _collect(processes: list, readers: list, timeout: float) -> list[Any]:
    """Wait for every rank's answer; fail fast on an error or on a silent death."""
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, str]] = {}
    give_up_at = time.monotonic() + timeout  # after a first error: a short grace period
    while len(results) + len(errors) < len(processes) and time.monotonic() < give_up_at:
        for rank, reader in enumerate(readers):
            if rank in results or rank in errors or not reader.poll(0.05):
                continue
            try:
                status, when, body = reader.recv()
            except EOFError:
                status, when = "error", time.time()
                body = f"died without an answer (exit code {processes[rank].exitcode})"
            if status == "ok":
                results[rank] = pickle.loads(body)
                continue
            if not errors:
                give_up_at = min(give_up_at, time.monotonic() + ERROR_GRACE_S)
            errors[rank] = (when, body)
    if errors:
        raise SpawnError(_first_failure(errors, len(processes)))
    if len(results) < len(processes):
        raise SpawnError(f"spawn timed out after {timeout:.0f} s; ranks done: {sorted(results)}")
    return [results[r] for r in range(len(processes))]


def _first_failure(errors: dict[int, tuple[float, str]], world: int) -> str:
    """The earliest failure is the cause; later ones are usually peers losing their connection."""
    rank = min(errors, key=lambda r: errors[r][0])
    others = sorted(set(errors) - {rank})
    after = f" (then rank(s) {others} failed too)" if others else ""
    return f"rank {rank} of {world} failed{after}:\n{errors[rank][1]}"
