"""MLflow tracking of real training runs, against a real ``mlflow server`` on 127.0.0.1.

One run per job and across resumes, every step's metrics exactly once, the resolved
config as params and artifact, statuses FINISHED / KILLED / FAILED, and training that
finishes whatever the server does (killed and restarted mid-run, or never there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, unused_uri
from tests.multiprocess import free_port, run_on_ranks
from tests.training_runs import logged, train_on_rank

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def _tracked(server: MlflowServer, experiment: str, run_dir: Path) -> list[str]:
    return [
        "tracking.enabled=true",
        f"tracking.tracking_uri={server.uri}",
        f"tracking.experiment={experiment}",
        f"run_dir={run_dir}",
        "tracking.flush_timeout_s=90",
    ]


def _runs(server: MlflowServer, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _steps(server: MlflowServer, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, key))


def test_a_multi_rank_run_is_one_mlflow_run_with_everything(setup, server):
    from mlflow.tracking import MlflowClient

    from hpd_megatron.tracking import flatten_params
    from hpd_megatron.training.config import load_run_config

    run_dir = setup["root"] / "tracked"
    overrides = _tracked(server, "tracked", run_dir) + ["parallel.tensor_model_parallel_size=2"]
    history = logged(run_on_ranks(train_on_rank, 2, setup["recipe"], overrides))
    (run,) = _runs(server, "tracked")
    assert run.info.status == "FINISHED"
    expected = flatten_params(load_run_config(setup["recipe"], overrides).to_dict())
    assert set(expected) <= set(run.data.params)
    assert run.data.params["parallel.tensor_model_parallel_size"] == "2"
    assert run.data.tags["world_size"] == "2"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "hpd/sample_differs"):
        points = MlflowClient(server.uri).get_metric_history(run.info.run_id, key)
        assert sorted(p.step for p in points) == [h["step"] for h in history], key
    losses = {
        p.step: p.value
        for p in MlflowClient(server.uri).get_metric_history(run.info.run_id, "loss")
    }
    assert all(losses[h["step"]] == pytest.approx(h["loss"], rel=1e-6) for h in history)
    artifacts = [a.path for a in MlflowClient(server.uri).list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts


def test_stop_and_resume_continue_one_run(setup, server):
    from tests.test_checkpoints import _train_until_signal

    run_dir = setup["root"] / "tracked_resumed"
    overrides = _tracked(server, "resumed", run_dir) + ["schedule.train_steps=5"]
    outcome = run_on_ranks(_train_until_signal, 1, setup["recipe"], overrides, 2)
    assert outcome[0]["stopped_after"] == 2
    (stopped,) = _runs(server, "resumed")
    assert stopped.info.status == "KILLED", "a stop signal ends the run KILLED"
    resumed = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], overrides))
    assert [h["step"] for h in resumed] == [3, 4, 5]
    (run,) = _runs(server, "resumed")
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert _steps(server, run.info.run_id) == [1, 2, 3, 4, 5], "every step exactly once"


def test_a_server_killed_and_restarted_mid_run_loses_nothing(setup, server):
    run_dir = setup["root"] / "tracked_outage"
    metrics = run_dir / "metrics.jsonl"
    overrides = _tracked(server, "outage", run_dir) + ["schedule.train_steps=8"]

    def outage() -> None:
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            time.sleep(0.2)
        server.stop()
        while len(metrics.read_text().splitlines()) < 5:
            time.sleep(0.2)
        server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    history = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], overrides, timeout=400))
    thread.join(timeout=120)
    assert server.running
    assert [h["step"] for h in history] == list(range(1, 9))
    (run,) = _runs(server, "outage")
    assert run.info.status == "FINISHED"
    assert _steps(server, run.info.run_id) == list(range(1, 9))


def test_an_unreachable_server_does_not_stop_training(setup):
    uri = unused_uri()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpd_megatron.train",
            "--config",
            setup["recipe"],
            "schedule.train_steps=2",
            f"run_dir={setup['root'] / 'unreachable'}",
            "tracking.enabled=true",
            f"tracking.tracking_uri={uri}",
            "tracking.flush_timeout_s=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        # A single process rendezvouses on 29500 by default, which another job may hold.
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout
    # One start-up line says what the run computes on; Megatron's fallback warnings are gone.
    assert result.stdout.splitlines()[0] == (
        "hpd-megatron: backend gloo, device cpu, layer spec local (no apex), student fp32, "
        "teacher fp32, layout TP=1 PP=1 CP=1 DP=1"
    )
    assert "is not installed" not in result.stderr and "are not installed" not in result.stderr
    assert f"cannot reach the tracking server at {uri}" in result.stderr


def test_an_error_in_training_leaves_the_run_failed(setup, server):
    from tests.test_checkpoints import _train_with_nan_steps

    run_dir = setup["root"] / "tracked_failed"
    overrides = _tracked(server, "failed", run_dir) + ["optimizer.max_consecutive_nonfinite=1"]
    outcome = run_on_ranks(_train_with_nan_steps, 1, setup["recipe"], overrides, [2])[0]
    assert outcome["error"].startswith("steps 2..2: loss or gradients not finite")
    (run,) = _runs(server, "failed")
    assert run.info.status == "FAILED"
    assert _steps(server, run.info.run_id) == [1, 2]
