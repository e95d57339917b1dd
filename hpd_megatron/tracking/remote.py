"""The MLflow side of a tracker: one run, created or continued, and the calls that feed it.

Every method here blocks on the network and may raise; only the delivery thread calls
them, and it decides what to retry (``is_permanent`` tells it which errors retrying
cannot fix). Two things make retries safe:

- Run creation carries a random ``hpd.creation_token`` tag. If a create request failed
  in a way that may have reached the server, the next attempt first looks for a run
  with that token, so a lost response never makes a second run.
- Metric points are only sent above the last step the server has recorded for their key
  (``last_steps``). After a failed metrics request the server's record is read again
  before resending, so points that did land are not sent twice; on a resume the same
  record tells which re-run steps are already there.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from hpd_megatron.tracking.outbox import MAX_TAGS_PER_REQUEST, ArtifactUpload, MetricPoint
from hpd_megatron.tracking.params import MAX_KEY_LENGTH, MAX_TAG_VALUE_LENGTH, truncate

CREATION_TOKEN_TAG = "hpd.creation_token"
PARAM_CHANGED_TAG_PREFIX = "resume.param_changed."
# A SQL store announces creating and migrating its tables at INFO on every new database:
# MLflow's own logger and alembic's, which runs the migration. Nothing a user acts on.
STORE_LOGGERS = ("mlflow.store.db.utils", "alembic")


def is_permanent(error: BaseException) -> bool:
    """True for errors a retry cannot fix: the server understood and refused (4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError))


def is_invalid_value(error: BaseException) -> bool:
    """The server rejected some value in the request (one bad metric name, say)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.get_http_status_code() == 400


class RemoteRun:
    """One MLflow run on one tracking URI. Not thread-safe: the delivery thread owns it."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None,
        artifact_location: str | None,
        say: Callable[[str], None],
        creation_token: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.resumed = run_id is not None
        self.attached = False
        self.last_steps: dict[str, int] = {}
        """Per metric key, the highest step the server holds (as far as we know)."""
        self.needs_refresh = False
        """A metrics request failed after possibly reaching the server: re-read last_steps."""
        self._experiment = experiment
        self._run_name = run_name
        self._params = params
        self._tags = tags
        self._artifact_location = artifact_location
        self._say = say
        self.creation_token = creation_token or uuid.uuid4().hex
        """Tagged on the run at creation. Known before the server answers, so a checkpoint
        saved before the run existed can still name it (``creation_token`` from there)."""
        self._creation_tried = creation_token is not None
        self._client = None

    # -- the run ----------------------------------------------------------------------
    def attach(self) -> None:
        """Create the run, or continue ``run_id``; log params and tags. Safe to call again
        after any failure: each step checks what is already done."""
        client = self._mlflow()
        if self.run_id is None and self._creation_tried:
            # A create request may have reached the server without its answer reaching us
            # (here, or in the earlier job whose checkpoint gave the token): continue that
            # run rather than create a second one.
            found = client.search_runs(
                [self._experiment_id(client)],
                f"tags.`{CREATION_TOKEN_TAG}` = '{self.creation_token}'",
                max_results=1,
            )
            if found:
                self.run_id, self.resumed = found[0].info.run_id, True
        if self.run_id is not None and self.resumed:
            self._continue_run(client)
        else:
            self._create_run(client)
        self.attached = True

    def _create_run(self, client) -> None:
        if self.run_id is None:
            self._creation_tried = True
            run = client.create_run(
                self._experiment_id(client),
                run_name=self._run_name,
                tags={**self._tags, CREATION_TOKEN_TAG: self.creation_token},
            )
            self.run_id = run.info.run_id
        self._log_params(client, self._params)

    def _continue_run(self, client) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            run = client.get_run(self.run_id)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            self._say(
                f"run {self.run_id} (from the checkpoint) is not in {self.tracking_uri} "
                f"or was deleted; starting a new run instead"
            )
            self.run_id, self.resumed = None, False
            self._create_run(client)
            return
        recorded = run.data.params
        missing = {key: value for key, value in self._params.items() if key not in recorded}
        changed = {
            key: value
            for key, value in self._params.items()
            if key in recorded and recorded[key] != value
        }
        self._log_params(client, missing)
        if changed:
            # Params are immutable; the resumed value is kept as a tag and said once.
            self._say(
                f"resumed run {self.run_id} keeps its original params; changed on resume "
                f"(recorded as {PARAM_CHANGED_TAG_PREFIX}* tags): {', '.join(sorted(changed))}"
            )
        tags = {
            **self._tags,
            **{
                truncate(PARAM_CHANGED_TAG_PREFIX + key, MAX_KEY_LENGTH): truncate(
                    value, MAX_TAG_VALUE_LENGTH
                )
                for key, value in changed.items()
            },
        }
        self.send_tags(tags)
        self.last_steps = _recorded_last_steps(client, run)
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self._experiment)
        if experiment is None:
            try:
                return client.create_experiment(
                    self._experiment, artifact_location=self._artifact_location
                )
            except MlflowException:
                # Another job may have created it meanwhile; if not, the error stands.
                experiment = client.get_experiment_by_name(self._experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self._say(
                f"experiment {self._experiment!r} was deleted in {self.tracking_uri}; restoring it"
            )
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _log_params(self, client, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), MAX_TAGS_PER_REQUEST):
            # Logging a param again with the same value is accepted, so a retry after a
            # partly failed attempt is harmless.
            client.log_batch(self.run_id, params=items[start : start + MAX_TAGS_PER_REQUEST])

    # -- what the run receives ------------------------------------------------------------
    def refresh_last_steps(self) -> None:
        self.last_steps = _recorded_last_steps(self._mlflow(), self._mlflow().get_run(self.run_id))
        self.needs_refresh = False

    def send_metrics(self, points: list[MetricPoint]) -> tuple[int, int]:
        """Send the points above the server's last step for their key, in one request.
        Returns (sent, skipped as already recorded)."""
        from mlflow.entities import Metric

        if self.needs_refresh:
            self.refresh_last_steps()
        fresh = [p for p in points if p[3] > self.last_steps.get(p[0], -1)]
        if fresh:
            try:
                self._mlflow().log_batch(
                    self.run_id,
                    metrics=[
                        Metric(key, value, timestamp, step) for key, value, timestamp, step in fresh
                    ],
                )
            except Exception as error:
                self.needs_refresh = not is_permanent(error)
                raise
            for key, _, _, step in fresh:
                self.last_steps[key] = max(step, self.last_steps.get(key, step))
        return len(fresh), len(points) - len(fresh)

    def send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, len(items), MAX_TAGS_PER_REQUEST):
            self._mlflow().log_batch(self.run_id, tags=items[start : start + MAX_TAGS_PER_REQUEST])

    def upload(self, artifact: ArtifactUpload) -> None:
        client = self._mlflow()
        if artifact.local_path.is_dir():
            # A directory lands as <artifact_path>/<its name>/..., as a file lands as
            # <artifact_path>/<its name>.
            name = artifact.local_path.name
            destination = f"{artifact.artifact_path}/{name}" if artifact.artifact_path else name
            client.log_artifacts(self.run_id, str(artifact.local_path), destination)
        else:
            client.log_artifact(self.run_id, str(artifact.local_path), artifact.artifact_path)

    def terminate(self, status: str) -> None:
        self._mlflow().set_terminated(self.run_id, status)

    def _mlflow(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            quiet_store_loggers()
            if self.tracking_uri.startswith("sqlite:///"):
                Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(
                    parents=True, exist_ok=True
                )
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client


def quiet_store_loggers() -> None:
    """Warnings and errors only from the SQL store's set-up (after mlflow's import, which
    configures its loggers)."""
    for name in STORE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _recorded_last_steps(client, run) -> dict[str, int]:
    """Per metric key, the highest step the run holds.

    The run's ``latest metrics`` carry the step of each key's newest point (MLflow's own
    system-metrics monitor reads them the same way), one request instead of every key's
    whole history; the history is the fallback should that attribute ever go away.
    """
    latest = getattr(run.data, "_metric_objs", None)
    if latest is not None:
        return {metric.key: metric.step for metric in latest}
    return {
        key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
