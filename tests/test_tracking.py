"""MLflow tracking against a real ``mlflow server`` on loopback (tests/mlflow_server.py).

One server serves the module (startup is 10-20 s here); the crash test kills and restarts
it on the same port and store. Each test uses its own experiment, so tests can check
"one run in the experiment".
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hpd_megatron.config import ConfigError, from_dict
from hpd_megatron.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    default_tags,
    flatten_params,
    start_tracking,
)
from tests.mlflow_server import DroppingProxy, MlflowServer, unused_uri

KEYS = ("loss", "lr", "grad_norm")
PARAMS = {
    "student": {"model": {"num_layers": 2, "hidden_size": 96}, "checkpoint": None},
    "checkpoint": {"stop_signals": ["SIGTERM", "SIGUSR1"], "save_interval": 3},
    "schedule": {"train_steps": 10},
    "seed": 7,
    "notes": "x" * 7000,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def fast_retries(uri: str, experiment: str, **overrides) -> TrackingConfig:
    """Short waits, so a restarted server is noticed quickly."""
    settings = dict(
        tracking_uri=uri,
        experiment=experiment,
        retry_initial_s=0.1,
        retry_max_s=1.0,
        request_timeout_s=5,
        flush_timeout_s=60.0,
    )
    return TrackingConfig(**{**settings, **overrides})


def log_steps(tracker: Tracker, steps, offset: float = 0.0) -> list[float]:
    """Log KEYS at each step; returns each call's duration in seconds."""
    durations = []
    for step in steps:
        start = time.perf_counter()
        tracker.log_metrics(
            {"loss": 10.0 / step + offset, "lr": 1e-3 * step, "grad_norm": float(step)}, step=step
        )
        durations.append(time.perf_counter() - start)
    return durations


def recorded_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def wait_until_sent(tracker: Tracker, points: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while tracker.stats.metric_points_sent < points:
        assert time.monotonic() < deadline, tracker.stats
        time.sleep(0.05)


def test_params_tags_metrics_artifacts_and_finished(server, tmp_path):
    client = MlflowClient(server.uri)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("seed: 7\nschedule:\n  train_steps: 10\n")
    reports = tmp_path / "verify"
    reports.mkdir()
    (reports / "report.json").write_text('{"ok": true}')
    config = fast_retries(server.uri, "full", run_name="tiny-hpd")
    tracker = start_tracking(config, tmp_path / "run", PARAMS, tags={"world_size": "4"})
    log_steps(tracker, range(1, 31))
    tracker.log_metrics({"loss": 99.0}, step=30)  # the same (key, step) again: dropped
    tracker.log_metrics({"../escape": 1.0, "eval/loss": 2.5}, step=30)  # MLflow refuses the first
    tracker.log_metrics({"nonfinite": math.nan}, step=1)
    tracker.log_metrics({"nonfinite": math.inf}, step=2)
    tracker.set_tags({"phase": "done"})
    tracker.log_artifact(config_file)
    config_file.write_text("changed after logging\n")  # small artifacts are copied when logged
    tracker.log_artifact(reports, artifact_path="converter")
    tracker.finish("FINISHED")

    run = only_run(client, "full")
    assert run.info.run_id == tracker.run_id
    assert run.info.run_name == "tiny-hpd"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["student.model.num_layers"] == "2"
    assert params["student.checkpoint"] == "None"
    assert params["checkpoint.stop_signals"] == "['SIGTERM', 'SIGUSR1']"
    assert params["seed"] == "7"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")
    assert set(params) == set(flatten_params(PARAMS))
    tags = run.data.tags
    assert tags["world_size"] == "4" and tags["phase"] == "done"
    for key, value in default_tags().items():
        assert tags[key] == value
    for key in KEYS:
        assert recorded_steps(client, run.info.run_id, key) == list(range(1, 31)), key
    assert [
        m.value for m in client.get_metric_history(run.info.run_id, "loss") if m.step == 30
    ] == [10.0 / 30]
    assert recorded_steps(client, run.info.run_id, "eval/loss") == [30]
    nonfinite = client.get_metric_history(run.info.run_id, "nonfinite")
    assert [m.step for m in nonfinite] == [1, 2] and math.isnan(nonfinite[0].value)
    assert tracker.stats.metric_points_undelivered == 1  # only the refused "../escape"
    assert tracker.stats.duplicate_points_dropped == 1
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    assert (downloaded / "config.yaml").read_text() == "seed: 7\nschedule:\n  train_steps: 10\n"
    assert (downloaded / "converter" / "verify" / "report.json").read_text() == '{"ok": true}'


def test_resume_continues_the_run_without_duplicates(server, tmp_path, capfd):
    client = MlflowClient(server.uri)
    config = fast_retries(server.uri, "resume")
    first = start_tracking(config, tmp_path / "run", PARAMS)
    log_steps(first, range(1, 7))  # checkpoint at step 3, then steps 4-6, then a stop
    first.finish("KILLED")
    run_id = first.run_id
    assert client.get_run(run_id).info.status == "KILLED"

    changed = {**PARAMS, "schedule": {"train_steps": 12}, "extra": {"new_key": 1}}
    second = start_tracking(config, tmp_path / "run", changed, run_id=run_id)
    assert second.run_id == run_id  # known at once: stored with the checkpoint
    log_steps(second, range(4, 13), offset=0.5)  # re-runs 4-6, then new steps
    second.finish("FINISHED")

    run = only_run(client, "resume")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in KEYS:
        assert recorded_steps(client, run_id, key) == list(range(1, 13)), key
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert losses[5] == 10.0 / 5  # the first record of a step stays
    assert losses[7] == 10.0 / 7 + 0.5
    assert run.data.params["schedule.train_steps"] == "10"  # params are immutable
    assert run.data.tags["resume.param_changed.schedule.train_steps"] == "12"
    assert run.data.params["extra.new_key"] == "1"
    assert second.stats.duplicate_points_dropped == 3 * len(KEYS)
    err = capfd.readouterr().err
    assert "schedule.train_steps" in err and f"continuing run {run_id}" in err


def test_a_checkpoint_saved_before_the_run_existed_still_continues_it(server, tmp_path):
    """A stop can come before the server has answered the create request; the checkpoint
    then holds the run token but no run id. The next job must find the run by the token."""
    client = MlflowClient(server.uri)
    config = fast_retries(server.uri, "resume-by-token")
    first = start_tracking(config, tmp_path / "run", PARAMS)
    token = first.run_token  # what the checkpoint saves, known before any request
    assert token
    log_steps(first, range(1, 4))
    first.finish("KILLED")

    second = start_tracking(config, tmp_path / "run", PARAMS, run_token=token)
    assert second.run_id is None  # not known until the search answers
    log_steps(second, range(3, 6))
    second.finish("FINISHED")

    run = only_run(client, "resume-by-token")
    assert run.info.run_id == first.run_id == second.run_id and run.info.status == "FINISHED"
    assert recorded_steps(client, run.info.run_id, "loss") == [1, 2, 3, 4, 5]


def test_lost_responses_are_not_resent(server, tmp_path):
    """The server handles a log-batch but its answer is lost: the tracker must not send
    those points again (it re-reads the run before retrying)."""
    client = MlflowClient(server.uri)
    proxy = DroppingProxy(server.port)
    try:
        tracker = start_tracking(
            fast_retries(proxy.uri, "lost-responses"), tmp_path / "run", {"a": 1}
        )
        log_steps(tracker, range(1, 4))
        wait_until_sent(tracker, 3 * len(KEYS))
        proxy.drop_responses("/runs/log-batch", 2)
        for step in range(4, 25):
            log_steps(tracker, [step])
            time.sleep(0.02)  # several batches, not one
        tracker.finish("FINISHED")
    finally:
        proxy.close()
    assert proxy.dropped >= 1  # two are armed; a slow tracker may batch all into one
    sent = Counter(
        (m["key"], int(m["step"]))
        for body in proxy.bodies("/runs/log-batch")
        for m in body.get("metrics", [])
    )
    assert sent and max(sent.values()) == 1, [k for k, n in sent.items() if n > 1]
    run = only_run(client, "lost-responses")
    assert run.info.status == "FINISHED"
    for key in KEYS:
        assert recorded_steps(client, run.info.run_id, key) == list(range(1, 25)), key


def test_server_killed_and_restarted(server, tmp_path, capfd):
    client = MlflowClient(server.uri)
    tracker = start_tracking(fast_retries(server.uri, "crash"), tmp_path / "run", PARAMS)
    log_steps(tracker, range(1, 11))
    wait_until_sent(tracker, 10 * len(KEYS))
    server.stop()
    durations = log_steps(tracker, range(11, 61))
    time.sleep(1.0)  # the delivery thread finds the server gone meanwhile
    durations += log_steps(tracker, range(61, 81))
    server.start()  # same port and store, 10-20 s: the tracker keeps retrying meanwhile
    log_steps(tracker, range(81, 91))
    start = time.perf_counter()
    tracker.finish("FINISHED")
    assert time.perf_counter() - start < 60.0
    assert statistics.median(durations) < 0.05 and max(durations) < 1.0, max(durations)

    run = only_run(client, "crash")
    assert run.info.status == "FINISHED"
    for key in KEYS:
        assert recorded_steps(client, run.info.run_id, key) == list(range(1, 91)), key
    assert tracker.stats.metric_points_undelivered == 0
    err = capfd.readouterr().err
    assert f"cannot reach the tracking server at {server.uri}" in err
    assert f"reached {server.uri} again" in err


def test_server_never_reachable(tmp_path, capfd):
    uri = unused_uri()
    config = fast_retries(uri, "nowhere", flush_timeout_s=1.5)
    tracker = start_tracking(config, tmp_path / "run", PARAMS)
    durations = log_steps(tracker, range(1, 201))
    tracker.set_tags({"phase": "done"})
    tracker.log_artifact(Path(__file__))
    start = time.perf_counter()
    tracker.finish("FAILED")
    assert time.perf_counter() - start < config.flush_timeout_s + 1.5
    assert statistics.median(durations) < 0.05
    assert tracker.run_id is None
    assert tracker.stats.metric_points_undelivered == 200 * len(KEYS)
    assert tracker.stats.artifacts_undelivered == 1 and not tracker.stats.status_set
    err = capfd.readouterr().err
    assert err.count(f"cannot reach the tracking server at {uri}") == 1
    assert f"could not deliver {200 * len(KEYS)} metric points, 1 tag batches, 1 artifacts" in err


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_terminal_status(server, tmp_path, status):
    client = MlflowClient(server.uri)
    tracker = start_tracking(
        fast_retries(server.uri, f"status-{status}"), tmp_path / "run", {"a": 1}
    )
    log_steps(tracker, range(1, 3))
    with pytest.raises(ValueError, match="status"):
        tracker.finish("DONE")
    tracker.finish(status)
    tracker.finish("FINISHED")  # a second finish changes nothing
    run = only_run(client, f"status-{status}")
    assert run.info.status == status and run.info.end_time is not None


def test_system_metrics(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(server.uri)
    tracker = start_tracking(
        fast_retries(server.uri, "system", system_metrics=True), tmp_path / "run", {"a": 1}
    )
    log_steps(tracker, range(1, 3))
    wait_until_sent(tracker, 2 * len(KEYS))
    time.sleep(1.0)
    tracker.finish("FINISHED")
    run = only_run(client, "system")
    assert any(key.startswith("system/cpu") for key in run.data.metrics), sorted(run.data.metrics)
    assert run.info.status == "FINISHED"


def test_default_store_is_sqlite_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "tiny"
    artifact = tmp_path / "config.yaml"
    artifact.write_text("seed: 7\n")
    tracker = start_tracking(TrackingConfig(experiment="local"), run_dir, PARAMS)
    log_steps(tracker, range(1, 6))
    tracker.log_artifact(artifact)
    tracker.finish("FINISHED")
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(tracker.tracking_uri)
    run = only_run(client, "local")
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert recorded_steps(client, run.info.run_id, "loss") == [1, 2, 3, 4, 5]
    stored = list((run_dir / "mlartifacts").rglob("config.yaml"))
    assert len(stored) == 1 and stored[0].read_text() == "seed: 7\n"


def test_tracking_uri_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    tracker = start_tracking(TrackingConfig(experiment="from-env"), tmp_path / "run", {"a": 1})
    log_steps(tracker, [1])
    tracker.finish("FINISHED")
    assert tracker.tracking_uri == server.uri
    assert only_run(MlflowClient(server.uri), "from-env").info.status == "FINISHED"
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_disabled_tracking_is_a_null_tracker(tmp_path):
    tracker = start_tracking(TrackingConfig(enabled=False), tmp_path, PARAMS)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(tmp_path)
    tracker.finish("FINISHED")
    assert not any(tmp_path.iterdir())


def test_flatten_params_and_config_errors():
    assert flatten_params({"a": {"b": {"c": 1}, "d": []}, "e": {}, "f": None, "g": math.inf}) == {
        "a.b.c": "1",
        "a.d": "[]",
        "e": "{}",
        "f": "None",
        "g": "inf",
    }
    assert from_dict(TrackingConfig, {"flush_timeout_s": 5, "run_name": "x"}).flush_timeout_s == 5.0
    with pytest.raises(ConfigError, match="tracking.request_timeout_s"):
        from_dict(TrackingConfig, {"request_timeout_s": 0.5})
    with pytest.raises(ConfigError, match="flush_timeout"):
        from_dict(TrackingConfig, {"flush_timeout": 5})
