"""Tracker: the training loop's handle on its MLflow run, never a reason to stop training.

    tracker = start_tracking(run.tracking, run_dir, run.to_dict(), run_id=from_checkpoint)
    try:
        for step in ...:
            tracker.log_metrics(metrics, step=step)      # returns at once
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")                          # or "KILLED" on a stop signal
        raise

Every call from the training thread only appends to an in-memory outbox. One background
thread creates or continues the run and delivers the outbox in order: metrics with
``log_batch`` (up to 1000 points a request), tags, artifacts, and last the terminal
status. A failed delivery is retried with exponential backoff; when the server cannot be
reached a single warning names the URI, and everything stays buffered (bounded by
``max_buffered_metrics``) until it answers again or ``finish`` gives up after
``flush_timeout_s``, saying what was not delivered.

Each (metric key, step) reaches the run at most once, across retries and resumes: see
``Outbox`` (per key, steps must increase) and ``RemoteRun`` (only steps above what the
server already holds are sent).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpd_megatron.tracking.config import (
    TrackingConfig,
    local_artifact_location,
    resolve_tracking_uri,
)
from hpd_megatron.tracking.outbox import (
    ArtifactUpload,
    Item,
    MetricBatch,
    Outbox,
    TagBatch,
    Terminate,
)
from hpd_megatron.tracking.params import MAX_TAG_VALUE_LENGTH, flatten_params, truncate
from hpd_megatron.tracking.redact import redact, redact_script, redact_values
from hpd_megatron.tracking.remote import RemoteRun, is_invalid_value, is_permanent
from hpd_megatron.tracking.tags import default_tags

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
STAGE_LIMIT_BYTES = 16 * 2**20
"""Artifacts up to this size are copied when logged, so the caller may change or delete
them at once; larger ones (checkpoints) are uploaded from where they are."""
FINISHING_RETRY_MAX_S = 2.0
REPORTED_REJECTIONS = 5


def say(message: str) -> None:
    """One line on stderr, prefixed so it is clear which component speaks; credentials (in
    the URI, or in an MLflow error that quotes it) are masked."""
    print(f"mlflow: {redact(message)}", file=sys.stderr, flush=True)


@dataclass
class DeliveryStats:
    """What happened to what was logged (a snapshot; complete after ``finish``)."""

    metric_points_sent: int = 0
    duplicate_points_dropped: int = 0
    """Points whose (key, step) was logged before or is already in the run (a resume)."""
    metric_points_undelivered: int = 0
    """Refused by the server, dropped from a full buffer, or still buffered at the end."""
    tag_batches_undelivered: int = 0
    artifacts_undelivered: int = 0
    status_set: bool = False


class Tracker:
    """Asynchronous logging into one MLflow run; see the module docstring."""

    def __init__(
        self,
        config: TrackingConfig,
        tracking_uri: str,
        params: dict[str, str],
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_token: str | None = None,
    ) -> None:
        self._config = config
        self._uri = tracking_uri
        self._outbox = Outbox(config.max_buffered_metrics)
        self._remote = RemoteRun(
            tracking_uri,
            config.experiment,
            run_name,
            params,
            dict(tags or {}),
            run_id,
            local_artifact_location(tracking_uri),
            say,
            creation_token=run_token,
        )
        self._stats = DeliveryStats()
        self._rejected = 0
        self._deadline: float | None = None
        self._status: str | None = None
        self._in_flight: Item | None = None
        self._abandoned = False
        self._finish_lock = threading.Lock()
        self._finished = False
        self._outage_since: float | None = None
        self._warned_at: float | None = None
        self._bad_metric_keys: set[str] = set()
        self._stage_root: Path | None = None
        self._staged = 0
        self._system_metrics = None
        self._thread = threading.Thread(
            target=self._deliver_until_finished, name="mlflow-tracking", daemon=True
        )
        self._thread.start()

    # -- the training thread's side ----------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The run's id: known at once on a resume, else once the server created the run."""
        return self._remote.run_id

    @property
    def run_token(self) -> str | None:
        """Known at once: save it with a checkpoint beside ``run_id``, which may still be
        None then; ``start_tracking(run_token=...)`` finds the run by it."""
        return self._remote.creation_token

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def stats(self) -> DeliveryStats:
        stats = DeliveryStats(**vars(self._stats))
        stats.duplicate_points_dropped += self._outbox.duplicates_dropped
        return stats

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` at ``step`` (the iteration). Non-finite values are logged as
        MLflow stores them (NaN as NaN, infinities clamped); per key, a step at or below
        one already logged is dropped."""
        timestamp = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                if key not in self._bad_metric_keys:
                    self._bad_metric_keys.add(key)
                    say(f"metric {key!r} is not a number ({value!r}); not logged")
                continue
            points.append((str(key), number, timestamp, int(step)))
        self._outbox.add_metrics(points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._outbox.add(
            TagBatch(
                {str(k): truncate(redact(str(v)), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}
            )
        )

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, *, redact_text: bool = False
    ) -> None:
        """Queue a file or directory; it lands as ``<artifact_path>/<its name>``.
        ``redact_text``: a text file (a submitted script) is sent as a copy with its
        credentials masked (``redact.redact_script``)."""
        path = Path(path)
        if not path.exists():
            say(f"artifact {path} does not exist; not logged")
            return
        staged = self._stage_redacted(path) if redact_text else self._stage(path)
        if staged is None:
            return
        self._outbox.add(ArtifactUpload(staged, artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is buffered (for at most ``flush_timeout_s``), set the run's status,
        stop the thread, and say what could not be delivered. A second call does nothing."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
        self._status = status
        self._deadline = time.monotonic() + self._config.flush_timeout_s
        self._outbox.add(Terminate(status))
        self._outbox.close()
        self._thread.join(self._config.flush_timeout_s + 1.0)
        if self._thread.is_alive():
            # A request is still hanging; leave the (daemon) thread behind rather than wait.
            self._abandoned = True
        self._report_undelivered()
        if self._stage_root is not None and not self._thread.is_alive():
            shutil.rmtree(self._stage_root, ignore_errors=True)

    def _stage_redacted(self, path: Path) -> Path | None:
        """A masked copy of text file ``path``; None (said) when it cannot be made, since
        the original must not be sent instead."""
        try:
            # surrogateescape: bytes that are not UTF-8 pass through unchanged.
            text = path.read_text(errors="surrogateescape")
            copy = self._stage_slot(path.name)
            copy.write_text(redact_script(text), errors="surrogateescape")
            return copy
        except OSError as error:
            say(f"artifact {path} not logged: {_one_line(error)}")
            return None

    def _stage_slot(self, name: str) -> Path:
        """A fresh path ``<stage root>/<n>/<name>`` whose parent exists."""
        if self._stage_root is None:
            self._stage_root = Path(tempfile.mkdtemp(prefix="hpd-mlflow-"))
        self._staged += 1
        copy = self._stage_root / str(self._staged) / name
        copy.parent.mkdir()
        return copy

    def _stage(self, path: Path) -> Path:
        try:
            size = (
                path.stat().st_size
                if path.is_file()
                else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            )
            if size > STAGE_LIMIT_BYTES:
                return path
            copy = self._stage_slot(path.name)
            if path.is_dir():
                shutil.copytree(path, copy)
            else:
                shutil.copy2(path, copy)
            return copy
        except OSError:
            return path  # upload from the original; a missing file is reported then

    # -- the delivery thread --------------------------------------------------------------
    def _deliver_until_finished(self) -> None:
        backoff = self._config.retry_initial_s
        while not self._abandoned and not self._past_deadline():
            try:
                if not self._remote.attached:
                    self._remote.attach()
                    self._on_attached()
            except Exception as error:  # noqa: BLE001 - nothing may escape this thread
                if is_permanent(error):
                    say(
                        f"cannot use {self._uri} ({_one_line(error)}); tracking is off for this run"
                    )
                    self._outbox.close()
                    return
                backoff = self._wait_after_failure(error, backoff)
                continue
            item = self._in_flight = self._outbox.take()
            if item is None:
                return  # finishing, and the final status was refused
            try:
                done = self._deliver(item)
            except Exception as error:  # noqa: BLE001
                if is_permanent(error):
                    self._refused(item, error)  # the server answered: no backoff
                else:
                    self._outbox.put_back([item])
                    backoff = self._wait_after_failure(error, backoff)
                continue
            finally:
                self._in_flight = None
            self._note_reached()
            backoff = self._config.retry_initial_s
            if done:
                return
        # Out of time with a backlog: set the status anyway if the server is answering, so
        # the run does not stay RUNNING.
        if (
            not self._abandoned
            and self._remote.attached
            and self._outage_since is None
            and self._status is not None
            and not self._stats.status_set
        ):
            try:
                self._finish_run(self._status)
            except Exception:  # noqa: BLE001
                pass

    def _deliver(self, item: Item) -> bool:
        """Send one item; True once the run's final status is set."""
        if isinstance(item, MetricBatch):
            if item.points:
                sent, skipped = self._remote.send_metrics(item.points)
                self._stats.metric_points_sent += sent
                self._stats.duplicate_points_dropped += skipped
        elif isinstance(item, TagBatch):
            self._remote.send_tags(item.tags)
        elif isinstance(item, ArtifactUpload):
            self._remote.upload(item)
        elif isinstance(item, Terminate):
            self._finish_run(item.status)
            return True
        return False

    def _finish_run(self, status: str) -> None:
        self._stop_system_metrics()  # its last samples land before the status
        self._remote.terminate(status)
        self._stats.status_set = True

    def _wait_after_failure(self, error: Exception, backoff: float) -> float:
        """Warn (once per outage), wait ``backoff`` s, return the next backoff."""
        self._note_outage(error)
        if self._deadline is None:
            self._outbox.wait_until_closed(backoff)  # finish() cuts the wait short
        else:
            remaining = self._deadline - time.monotonic()
            time.sleep(max(0.0, min(backoff, FINISHING_RETRY_MAX_S, remaining)))
        return min(max(backoff * 2, 0.05), self._config.retry_max_s)

    def _refused(self, item: Item, error: Exception) -> None:
        """The server refused ``item``: retrying cannot help, so it is counted and said."""
        if isinstance(item, MetricBatch) and len(item.points) > 1 and is_invalid_value(error):
            # One bad point (a key MLflow does not accept, say) must not cost its whole
            # batch: split it until the bad point is alone.
            half = len(item.points) // 2
            self._outbox.put_back(
                [MetricBatch(item.points[:half]), MetricBatch(item.points[half:])]
            )
            return
        if isinstance(item, MetricBatch):
            self._stats.metric_points_undelivered += len(item.points)
        elif isinstance(item, TagBatch):
            self._stats.tag_batches_undelivered += 1
        elif isinstance(item, ArtifactUpload):
            self._stats.artifacts_undelivered += 1
        self._rejected += 1
        if self._rejected <= REPORTED_REJECTIONS:
            say(f"{self._uri} refused {_describe(item)}: {_one_line(error)}")

    def _on_attached(self) -> None:
        remote = self._remote
        if remote.resumed and remote.last_steps:
            say(
                f"continuing run {remote.run_id} (recorded up to step "
                f"{max(remote.last_steps.values())}); re-run steps already recorded are not "
                "logged again"
            )
        self._start_system_metrics(resume=remote.resumed)

    def _start_system_metrics(self, resume: bool) -> None:
        if not self._config.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_metrics = SystemMetricsMonitor(
                self._remote.run_id, resume_logging=resume, tracking_uri=self._uri
            )
            self._system_metrics.start()
        except Exception as error:  # noqa: BLE001 - an optional extra (needs psutil)
            self._system_metrics = None
            say(f"system metrics not available: {_one_line(error)}")

    def _stop_system_metrics(self) -> None:
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            monitor.finish()

    def _note_outage(self, error: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            # One line per outage, at most every 5 minutes if the server keeps flapping.
            if self._warned_at is None or now - self._warned_at > 300:
                self._warned_at = now
                say(
                    f"cannot reach the tracking server at {self._uri} ({_one_line(error)}); "
                    f"training goes on, metrics are buffered and retried in the background"
                )

    def _note_reached(self) -> None:
        if self._outage_since is not None:
            self._outage_since = None
            if self._warned_at is not None:
                say(f"reached {self._uri} again; sending what was buffered")
            if self._system_metrics is not None and self._remote.attached:
                # MLflow's monitor gives up for good when the server does not answer it.
                self._stop_system_metrics()
                self._start_system_metrics(resume=True)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _report_undelivered(self) -> None:
        pending = self._outbox.pending()
        in_flight = self._in_flight  # only when the thread was left behind mid-request
        if isinstance(in_flight, MetricBatch):
            pending["metric points"] += len(in_flight.points)
        elif isinstance(in_flight, TagBatch):
            pending["tag batches"] += 1
        elif isinstance(in_flight, ArtifactUpload):
            pending["artifacts"] += 1
        self._stats.metric_points_undelivered += pending["metric points"] + self._outbox.discarded
        self._stats.tag_batches_undelivered += pending["tag batches"]
        self._stats.artifacts_undelivered += pending["artifacts"]
        lost = {
            "metric points": self._stats.metric_points_undelivered,
            "tag batches": self._stats.tag_batches_undelivered,
            "artifacts": self._stats.artifacts_undelivered,
        }
        parts = [f"{count} {what}" for what, count in lost.items() if count]
        if not self._stats.status_set:
            parts.append("the run's final status")
        if parts:
            run = f"run {self.run_id}" if self.run_id else "no run was created"
            say(
                f"could not deliver {', '.join(parts)} to {self._uri} ({run}) within "
                f"flush_timeout_s={self._config.flush_timeout_s:g}"
            )


class NullTracker:
    """Logs nothing: for the ranks that do not track, and for ``tracking.enabled: false``.

    A plain class with the ``Tracker``'s public methods: no thread, no outbox, no server.
    """

    run_id: str | None = None
    run_token: str | None = None
    tracking_uri = ""

    @property
    def stats(self) -> DeliveryStats:
        return DeliveryStats()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, *, redact_text: bool = False
    ) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def start_tracking(
    config: TrackingConfig,
    run_dir: Path,
    params: Mapping[str, Any],
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_token: str | None = None,
) -> Tracker | NullTracker:
    """Start tracking this job (call it on the one logging rank; the others need nothing, or
    a ``NullTracker``). ``run_id`` (from the checkpoint) continues that run; else a
    ``run_token`` from the checkpoint continues the run created with it, if any; else a
    new run is created in ``config.experiment``. ``params`` is the nested resolved config;
    ``tags`` are added to ``default_tags()``; credentials in params and tags are masked
    (``redact``). Returns at once, whatever the server's state."""
    if not config.enabled:
        return NullTracker()
    try:
        import mlflow.tracking  # noqa: F401 - imported here, once, not on the delivery thread
    except ImportError as error:
        say(f"mlflow is not importable ({error}); tracking is off for this run")
        return NullTracker()
    _limit_mlflow_http_retries(config.request_timeout_s)
    run_dir = Path(run_dir)
    return Tracker(
        config,
        resolve_tracking_uri(config, run_dir),
        flatten_params(redact_values(params)),
        run_name=config.run_name or run_dir.resolve().name,
        run_id=run_id,
        tags=redact_values({**default_tags(), **(tags or {})}),
        run_token=run_token,
    )


def _limit_mlflow_http_retries(request_timeout_s: float) -> None:
    """MLflow retries a failed request itself, by default 7 times with exponential backoff
    (minutes) and a 120 s timeout each, and reads these settings from the environment at
    every request. The tracker has its own backoff, so one try per request, and a short
    timeout, keep a dead server from holding the delivery thread (and finish()) for minutes.
    Process-wide: nothing else in a training process talks to MLflow."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(math.ceil(request_timeout_s))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return truncate(f"{type(error).__name__}: {text[0] if text else ''}", 300)


def _describe(item: Item) -> str:
    if isinstance(item, MetricBatch):
        return (
            f"{len(item.points)} metric point(s) ({', '.join(sorted({p[0] for p in item.points}))})"
        )
    if isinstance(item, TagBatch):
        return f"tags {', '.join(sorted(item.tags))}"
    if isinstance(item, ArtifactUpload):
        return f"artifact {item.local_path}"
    return f"status {item.status}"
