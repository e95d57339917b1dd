"""Run a test body on N gloo ranks from pytest.

``run_on_ranks(body, world_size, *args)`` spawns ``world_size`` fresh processes (spawn,
never fork: torch's thread pools do not survive a fork), sets the torchrun variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls ``body(*args)`` in
each. It returns the per-rank return values, so the parent can compare results across
layouts. If any rank raises, every rank's traceback is reported; if the ranks do not
finish within ``timeout`` seconds they are killed and the report says which hung.

``body`` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    body: Callable[..., Any],
    args: tuple,
    results: mp.Queue[tuple[int, bool, Any]],
    threads: int,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        # Several ranks share two cores: one thread each avoids oversubscription.
        torch.set_num_threads(threads)
        value = body(*args)
        # Serialise here: torch would otherwise pass tensors as shared-memory handles
        # that die with this process before the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(
    body: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``body(*args)`` on ``world_size`` ranks; return their results by rank."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, port, body, args, results, threads),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
                outcomes[rank] = (ok, value)
                if not ok:
                    # One failure usually leaves the others blocked in a collective:
                    # give them a moment to fail on their own, then stop waiting.
                    deadline = min(deadline, time.monotonic() + 10.0)
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and results.empty():
                    break
    finally:
        for process in processes:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()

    failures = [
        f"--- rank {rank} raised:\n{value}"
        for rank, (ok, value) in sorted(outcomes.items())
        if not ok
    ]
    missing = [rank for rank in range(world_size) if rank not in outcomes]
    if missing:
        codes = {rank: processes[rank].exitcode for rank in missing}
        failures.append(
            f"--- ranks {missing} did not finish within {timeout:.0f}s or died (exit codes {codes})"
        )
    if failures:
        pytest.fail(
            f"{body.__name__} on {world_size} ranks failed:\n" + "\n".join(failures), pytrace=False
        )
    import torch

    return [
        torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(world_size)
    ]
