"""An evaluation's summary into MLflow, as a child run of the training run it evaluates.

Each evaluation is its own MLflow run, tagged ``mlflow.parentRunId`` = the training run
(the UI nests it there) with metrics at step = the checkpoint's training step. Logging into
the training run itself would have to reopen it (MLflow sets it RUNNING again) and close it
with a status of the evaluation's choosing, which is wrong while training still runs.

Where: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``; neither (or ``--no-tracking``):
nothing is logged. Never a store the checkpoint names: a checkpoint may come from anyone,
and MLflow sends ``MLFLOW_TRACKING_TOKEN`` to whatever server the URI names (or creates an
SQLite file wherever it points). Only the experiment's name is taken from the checkpoint's
training config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpd_megatron.config import from_dict
from hpd_megatron.eval.source import CheckpointInfo
from hpd_megatron.tracking import TrackingConfig, start_tracking

PARENT_RUN_TAG = "mlflow.parentRunId"


def tracking_target(
    info: CheckpointInfo, tracking_uri: str | None, experiment: str | None
) -> TrackingConfig | None:
    """The tracking settings of this evaluation, or None when the user names no store."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        return None
    training = (info.training or {}).get("tracking")
    config = from_dict(TrackingConfig, training, "tracking") if isinstance(training, dict) else None
    return TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment
        or (config.experiment if config is not None else TrackingConfig.experiment),
        flush_timeout_s=30.0,
    )


def log_evaluation(
    config: TrackingConfig,
    run_name: str,
    out_dir: Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    step: int,
    parent_run_id: str | None,
    tags: Mapping[str, str],
    artifacts: list[Path],
) -> str | None:
    """Create the evaluation's run, log everything, finish it; returns its run id."""
    config.run_name = run_name
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    tracker = start_tracking(config, out_dir, dict(params), tags=all_tags)
    tracker.log_metrics(metrics, step)
    for artifact in artifacts:
        tracker.log_artifact(artifact)
    tracker.finish("FINISHED")
    return tracker.run_id
