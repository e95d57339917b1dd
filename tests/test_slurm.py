"""The sbatch templates, submitted unchanged to a real single-node Slurm started here.

Environment overrides and sbatch flags select the tiny CPU recipe over gloo with 4 tasks
on one node (the templates' own defaults ask for 8 GPUs per node and, for 70B->8B, 4 nodes;
the test cluster accepts those headers through count-only GPUs and powered-down cloud
nodes, see tests/slurm_cluster.py). Under CI=true these tests fail instead of skipping
when Slurm is missing: `make test` installs it as root on Debian.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.multiprocess import run_on_ranks
from tests.slurm_cluster import SlurmCluster, missing_programs

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((ROOT / "slurm").glob("*.sh"))
JOB_TEMPLATES = ["hpd_70b_to_8b.sh", "train.sh", "convert.sh"]
STEPS = 16
# One node, 4 ranks (the tiny recipe's PP=2 gives DP=2), one CPU each.
ONE_NODE = ["--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1"]


def _require_slurm() -> None:
    missing = missing_programs()
    if os.geteuid() != 0:
        missing.append("root (slurmd runs jobs as root here)")
    if missing:
        message = f"needs {', '.join(missing)} (`make test` installs them as root on Debian)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def save_tiny_teacher(directory: str) -> None:
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=5)
    description = ModelDescription.from_yaml(str(ROOT / "recipes" / "models" / "tiny_teacher.yaml"))
    save_model_weights(build_gpt_model(description, transformer_config(description)), directory)
    destroy_parallel()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("teacher") / "weights"
    run_on_ranks(save_tiny_teacher, 1, str(directory))
    return str(directory)


def _overrides(run_dir: Path, teacher: str, data: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"teacher.checkpoint={teacher}",
        f"data.train={data}",
        f"schedule.train_steps={STEPS}",
        "schedule.global_batch_size=8",
        "schedule.micro_batch_size=2",
        "logging.log_interval=1",
        f"checkpoint.export_dir={run_dir}/export",
    ]


def _submit(
    cluster: SlurmCluster,
    workdir: Path,
    script: str,
    *args: str,
    flags: tuple[str, ...] = (),
    env: dict | None = None,
) -> int:
    """sbatch from ``workdir`` (so logs/ is there); the checkout comes from HPD_HOME."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    result = cluster.run(
        "sbatch",
        "--parsable",
        *flags,
        str(ROOT / "slurm" / script),
        *args,
        cwd=workdir,
        check=False,
        env={"HPD_HOME": str(ROOT), "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().split(";")[0])


def _log(workdir: Path, job: dict) -> str:
    return (workdir / "logs" / f"{job['JobName']}_{job['JobId']}.out").read_text()


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _mlflow_runs(run_dir: Path) -> tuple[list, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    experiments = client.search_experiments()
    return [run for e in experiments for run in client.search_runs([e.experiment_id])], client


def test_templates_pass_shellcheck():
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, TEMPLATES)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert {t.name for t in TEMPLATES} >= set(JOB_TEMPLATES) | {"common.sh"}


@pytest.mark.parametrize(
    "script,args",
    [
        ("hpd_70b_to_8b.sh", ()),
        ("train.sh", ("recipes/tiny_cpu.yaml",)),
        ("convert.sh", ("hf-to-megatron", "--hf-dir", "in", "--out", "out")),
    ],
)
def test_sbatch_test_only_accepts_every_template(cluster, tmp_path, script, args):
    (tmp_path / "logs").mkdir()
    result = cluster.run(
        "sbatch", "--test-only", str(ROOT / "slurm" / script), *args, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr
    if script == "hpd_70b_to_8b.sh":  # the header's own 4 nodes x 8 tasks
        assert "using 512 processors on nodes" in result.stderr


@pytest.fixture(scope="module")
def straight_run(cluster, teacher, prepared_data, tmp_path_factory) -> dict:
    """slurm/hpd_70b_to_8b.sh itself, pointed at the tiny CPU recipe: one uninterrupted job."""
    workdir = tmp_path_factory.mktemp("straight")
    run_dir = workdir / "run"
    job_id = _submit(
        cluster,
        workdir,
        "hpd_70b_to_8b.sh",
        *_overrides(run_dir, teacher, prepared_data),
        flags=tuple(ONE_NODE),
        env={"HPD_RECIPE": "recipes/tiny_cpu.yaml"},
    )
    job = cluster.wait(job_id, timeout=600)
    return {"job": job, "log": _log(workdir, job), "run_dir": run_dir}


def test_the_70b_template_runs_the_tiny_recipe_to_completion(straight_run):
    job, log, run_dir = straight_run["job"], straight_run["log"], straight_run["run_dir"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    # The planner's dry run came first, for the layout the job really has.
    assert log.index("world 4 GPUs: TP=1 PP=2 DP=2") < log.index("launching 4 rank(s)")
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert (run_dir / "export" / "model.yaml").is_file()
    # One MLflow run holding the same numbers, and the script as submitted.
    runs, client = _mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = {p.step: p.value for p in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == {m["step"]: m["loss"] for m in metrics}
    script = Path(
        client.download_artifacts(runs[0].info.run_id, "slurm", str(run_dir / "artifacts"))
    )
    assert (ROOT / "slurm" / "hpd_70b_to_8b.sh").read_text() in [
        p.read_text() for p in script.iterdir()
    ]


def test_a_stop_signal_requeues_the_same_job_which_resumes(
    cluster, teacher, prepared_data, tmp_path, straight_run
):
    run_dir = tmp_path / "run"
    job_id = _submit(
        cluster,
        tmp_path,
        "train.sh",
        "recipes/tiny_cpu.yaml",
        *_overrides(run_dir, teacher, prepared_data),
        flags=tuple(ONE_NODE),
    )
    # What --signal=B:USR1@300 does before the time limit: signal the batch shell only.
    deadline = time.monotonic() + 300
    while len(_metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, "no training step within 300 s"
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    job = cluster.wait(job_id, timeout=600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = _log(tmp_path, job)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log
    assert "requeueing job" in log and f"job {job_id} (restart 1)" in log
    assert "stop signal: passing it to the ranks" in log and "resumed from" in log
    metrics = _metrics(run_dir)
    # Each step exactly once, and the same numbers as the uninterrupted job.
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), log
    straight = _metrics(straight_run["run_dir"])
    for resumed, reference in zip(metrics, straight):
        assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-7), resumed[
            "step"
        ]
    # The tracking run continued: one run, every step once.
    runs, client = _mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted(p.step for p in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == list(range(1, STEPS + 1))


def test_missing_inputs_fail_the_job_before_any_rank_starts(cluster, tmp_path):
    missing = {
        "HPD_TEACHER_CKPT": str(tmp_path / "no-teacher"),
        "HPD_STUDENT_CKPT": str(tmp_path / "no-student"),
        "HPD_DATA": str(tmp_path / "no-data" / "train"),
        "HPD_RUN_DIR": str(tmp_path / "run"),
    }
    job_id = _submit(cluster, tmp_path, "hpd_70b_to_8b.sh", flags=tuple(ONE_NODE), env=missing)
    job = cluster.wait(job_id, timeout=300)
    log = _log(tmp_path, job)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log
    assert f"teacher.checkpoint: {missing['HPD_TEACHER_CKPT']}: no such checkpoint directory" in log
    assert f"checkpoint.load: {missing['HPD_STUDENT_CKPT']}: no such checkpoint directory" in log
    assert f"data.train: {missing['HPD_DATA']}.json: no such file" in log
    assert "no rank was started" in log and "launching" not in log
    assert not (tmp_path / "run").exists()


def _checkout_with_venv(home: Path, system_site_packages: bool) -> Path:
    """A stand-in checkout whose .venv looks built inside a container (`make venv` on a GPU
    node: --system-site-packages) or outside one."""
    venv = home / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    flag = "true" if system_site_packages else "false"
    (venv / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = {flag}\n")
    return venv / "bin" / "python"


@pytest.mark.parametrize(
    "image,venv_in_container",
    [
        ("", False),
        ("nvcr.io/nvidia/pytorch:25.01-py3", True),
        ("nvcr.io/nvidia/pytorch:25.01-py3", False),
    ],
)
def test_environment_rendezvous_and_container_flags(cluster, tmp_path, image, venv_in_container):
    home = tmp_path / "checkout"
    venv_python = _checkout_with_venv(home, venv_in_container)
    script = (
        f"source {ROOT}/slurm/common.sh; hpd_environment >&2; "
        'echo "$MASTER_ADDR $MASTER_PORT $HPD_PYTHON"; printf "%s\\n" "${HPD_SRUN_ARGS[@]}"'
    )
    env = {
        "SLURM_JOB_NODELIST": "gpu-[017-018,020]",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_RESTART_COUNT": "2",
        "HPD_HOME": str(home),
        "CONTAINER_IMAGE": image,
        "CONTAINER_MOUNTS": "/data:/data",
    }
    result = cluster.run("bash", "-c", script, cwd=ROOT, env=env)
    first, *flags = result.stdout.splitlines()
    # Outside a container the venv; inside, the venv only if it was built there.
    python = str(venv_python) if venv_in_container or not image else "python"
    assert first == f"gpu-017 {20000 + 123456 % 20000} {python}"
    assert ("warning: no venv built inside the container" in result.stdout + result.stderr) == (
        python == "python"
    )
    if image:
        assert flags == [
            f"--container-image={image}",
            "--container-name=hpd-123456-2",  # one container per job (and restart) and node
            f"--container-mounts={home}:{home},/data:/data",
            f"--container-workdir={home}",
            "--no-container-mount-home",
        ]
    else:
        assert flags == [""]  # printf's one empty line: no container flag at all
