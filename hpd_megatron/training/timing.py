"""Time spent in marked regions of a step, without synchronising the device inside them.

On a GPU a region's start and end are recorded as CUDA events and read when the step's
time is taken (the metrics wait for the device there anyway); Megatron-Core's ``Timers``
synchronise at every start and stop instead, which would stall the pipeline inside the
forward. On the CPU the clock is read directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class RegionTimer:
    """Sums the wall time of ``region()`` blocks until ``take_seconds()``."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def region(self) -> Iterator[None]:
        if torch.cuda.is_available():
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        began = time.perf_counter()
        yield
        self._seconds += time.perf_counter() - began

    def take_seconds(self) -> float:
        """The total since the last call (waits for the recorded events)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        seconds, self._seconds = self._seconds, 0.0
        return seconds
