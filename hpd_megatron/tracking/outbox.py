"""What the training thread has asked to log and the delivery thread has not yet sent.

The training thread only appends here (under a lock, no I/O), so logging costs it
microseconds whatever the server does. Metric points are deduplicated on the way in:
per key, a point whose step is not above the last accepted step is dropped, which is
what makes "each (key, step) at most once" a local property of the tracker.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_TAGS_PER_REQUEST = 100

# (key, value, timestamp in ms, step); the timestamp is taken when logged, so a resent
# point is byte-for-byte the same row (MLflow's SQL store ignores exact duplicates).
MetricPoint = tuple[str, float, int, int]


@dataclass
class MetricBatch:
    points: list[MetricPoint] = field(default_factory=list)


@dataclass
class TagBatch:
    tags: dict[str, str]


@dataclass
class ArtifactUpload:
    local_path: Path
    """A file or directory; a staged copy keeps the original's name."""
    artifact_path: str | None


@dataclass
class Terminate:
    status: str


Item = MetricBatch | TagBatch | ArtifactUpload | Terminate


class Outbox:
    """A FIFO of items to deliver, shared by the training thread and the delivery thread."""

    def __init__(self, max_buffered_metrics: int) -> None:
        self._items: deque[Item] = deque()
        self._condition = threading.Condition()
        self._last_step: dict[str, int] = {}
        self._max_points = max_buffered_metrics
        self._buffered_points = 0
        self._closed = False
        self.duplicates_dropped = 0
        self.discarded = 0
        """Points dropped from a full buffer, or logged after close()."""

    # -- training thread -------------------------------------------------------------
    def add_metrics(self, points: list[MetricPoint]) -> None:
        with self._condition:
            if self._closed:
                self.discarded += len(points)
                return
            fresh = []
            for point in points:
                key, step = point[0], point[3]
                if key in self._last_step and step <= self._last_step[key]:
                    self.duplicates_dropped += 1
                    continue
                self._last_step[key] = step
                fresh.append(point)
            if not fresh:
                return
            tail = self._items[-1] if self._items else None
            if (
                isinstance(tail, MetricBatch)
                and len(tail.points) + len(fresh) <= MAX_METRICS_PER_REQUEST
            ):
                tail.points.extend(fresh)
            else:
                self._items.append(MetricBatch(fresh))
            self._buffered_points += len(fresh)
            self._drop_oldest_beyond_limit()
            self._condition.notify_all()

    def add(self, item: Item, *, even_if_closed: bool = False) -> None:
        with self._condition:
            if self._closed and not even_if_closed:
                return
            self._items.append(item)
            self._condition.notify_all()

    def close(self) -> None:
        """No more items from the training thread; wake the delivery thread to finish up."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    # -- delivery thread --------------------------------------------------------------
    def take(self) -> Item | None:
        """The oldest item, waiting for one; None once closed and empty."""
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, MetricBatch):
                self._buffered_points -= len(item.points)
            return item

    def put_back(self, items: list[Item]) -> None:
        """Return undelivered items to the front, in order, to be retried first."""
        with self._condition:
            for item in reversed(items):
                self._items.appendleft(item)
                if isinstance(item, MetricBatch):
                    self._buffered_points += len(item.points)
            self._drop_oldest_beyond_limit()

    def wait_until_closed(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s (a retry's backoff), cut short by close()."""
        with self._condition:
            self._condition.wait_for(lambda: self._closed, timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> dict[str, int]:
        """Counts of what is still waiting: metric points, tag batches, artifacts."""
        with self._condition:
            return {
                "metric points": sum(
                    len(i.points) for i in self._items if isinstance(i, MetricBatch)
                ),
                "tag batches": sum(isinstance(i, TagBatch) for i in self._items),
                "artifacts": sum(isinstance(i, ArtifactUpload) for i in self._items),
            }

    def _drop_oldest_beyond_limit(self) -> None:
        excess = self._buffered_points - self._max_points
        for item in self._items:
            if excess <= 0:
                break
            if isinstance(item, MetricBatch) and item.points:
                cut = min(excess, len(item.points))
                del item.points[:cut]
                excess -= cut
                self._buffered_points -= cut
                self.discarded += cut
