"""TrackingConfig: where MLflow runs go and how hard the tracker tries to deliver.

A section of the run's YAML (``tracking:``), mapped by ``hpd_megatron.config.from_dict``.
Bad values fail with the dotted key, like every other section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpd_megatron.errors import ConfigError


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "hpd-megatron"
    run_name: str | None = None
    """None: the run directory's name."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db (MLflow's plain file
    store is deprecated), with that store's artifacts in <run_dir>/mlartifacts."""
    system_metrics: bool = False
    """MLflow's own system metrics (CPU, memory, disk, network, GPU) under ``system/``."""
    log_checkpoints: bool = False
    """Upload checkpoint directories as artifacts; off by default (they are large)."""
    flush_timeout_s: float = 60.0
    """At finish(): how long to keep retrying what is still buffered before giving up."""
    request_timeout_s: float = 10.0
    """One HTTP request's connect/read timeout. MLflow's own retries are switched off for
    the process; the tracker retries with its own backoff, off the training thread."""
    retry_initial_s: float = 1.0
    """First wait after a failed delivery; doubled after each further failure..."""
    retry_max_s: float = 30.0
    """...up to this (while finishing, retries come at least every 2 s)."""
    max_buffered_metrics: int = 500_000
    """Metric points held while the server is unreachable; beyond this the oldest are
    dropped (and counted in the final warning) so a long outage cannot exhaust memory."""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment: must not be empty")
        for name in ("flush_timeout_s", "retry_initial_s", "retry_max_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tracking.{name}: must be >= 0, got {getattr(self, name)}")
        if self.request_timeout_s < 1:
            # MLflow reads the timeout as whole seconds.
            raise ConfigError(
                f"tracking.request_timeout_s: must be >= 1, got {self.request_timeout_s}"
            )
        if self.max_buffered_metrics < 1:
            raise ConfigError(
                f"tracking.max_buffered_metrics: must be >= 1, got {self.max_buffered_metrics}"
            )


def resolve_tracking_uri(config: TrackingConfig, run_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in ``run_dir``."""
    if config.tracking_uri:
        return config.tracking_uri
    from_environment = os.environ.get("MLFLOW_TRACKING_URI")
    if from_environment:
        return from_environment
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store: ``mlartifacts`` beside the database file (MLflow's own default
    would be ./mlruns in whatever directory the job was started from). Else None: the
    server decides (with ``mlflow server``, its artifact proxy)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    if str(database) in ("", ":memory:"):
        return None
    return (database.parent / "mlartifacts").resolve().as_uri()
