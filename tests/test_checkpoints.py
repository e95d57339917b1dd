"""Checkpoints: exact resume, stop signals, SIGKILL mid-save, damaged files, numerical faults."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.multiprocess import free_port, run_on_ranks
from tests.training_runs import (
    STUDENT,
    assert_resume_kept_the_loaded_weights,
    logged,
    read_student,
    resume_without_optimizer_state,
    train_on_rank,
)

TP2_PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
PRECISIONS = {
    "fp32": [],
    "bf16": ["params_dtype=bf16"],
    # Saved in the default dp_reshardable format; test_resume_on_other_layouts_and_optimizers
    # continues the fully_reshardable one for two steps.
    "bf16 distributed optimizer": ["params_dtype=bf16", "optimizer.use_distributed_optimizer=true"],
}


@pytest.mark.parametrize("precision", list(PRECISIONS.values()), ids=list(PRECISIONS))
def test_stop_and_resume_continues_exactly_at_tp2_pp2(setup, precision, request):
    layout = TP2_PP2 + precision + ["schedule.train_steps=6"]
    name = request.node.callspec.id.replace(" ", "_")
    straight_dir, resumed_dir = (
        setup["root"] / f"straight_{name}",
        setup["root"] / f"resumed_{name}",
    )
    straight = logged(
        run_on_ranks(
            train_on_rank,
            4,
            setup["recipe"],
            layout
            + [f"run_dir={straight_dir}", f"checkpoint.export_dir={straight_dir / 'export'}"],
        )
    )
    resumed_run = layout + [
        f"run_dir={resumed_dir}",
        "checkpoint.save_interval=3",
        f"checkpoint.export_dir={resumed_dir / 'export'}",
    ]
    first = logged(
        run_on_ranks(train_on_rank, 4, setup["recipe"], resumed_run + ["schedule.exit_interval=3"])
    )
    assert [h["step"] for h in first] == [1, 2, 3]
    assert (resumed_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    assert not (resumed_dir / "export").exists(), "a stopped run exports nothing"
    second = logged(run_on_ranks(train_on_rank, 4, setup["recipe"], resumed_run))
    assert [h["step"] for h in second] == [4, 5, 6]
    for expected, got in zip(straight, first + second):
        for key in ("loss", "cross_entropy", "grad_norm", "lr", "hpd/sample_differs"):
            assert got[key] == expected[key], (got["step"], key, got[key], expected[key])
    a = run_on_ranks(read_student, 1, str(straight_dir / "export"))[0]
    b = run_on_ranks(read_student, 1, str(resumed_dir / "export"))[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_bf16_resume_without_optimizer_state_keeps_the_loaded_weights(setup, optimizer):
    """The fresh optimizer's fp32 main weights must come from the checkpoint, not from the
    weights the model was built with; else its first step writes those back."""
    lr = 0.02
    run = TP2_PP2 + [
        "params_dtype=bf16",
        f"optimizer.use_distributed_optimizer={str(optimizer == 'distributed').lower()}",
        f"optimizer.lr={lr}",
        "schedule.warmup_steps=0",
        "schedule.decay_style=constant",
        f"run_dir={setup['root'] / f'bf16_no_optimizer_state_{optimizer}'}",
        "schedule.train_steps=5",
    ]
    # Four steps, saved; then the last step resumes with a fresh optimizer.
    run_on_ranks(train_on_rank, 4, setup["recipe"], run + ["schedule.exit_interval=4"])
    ranks = run_on_ranks(
        resume_without_optimizer_state,
        4,
        setup["recipe"],
        run + ["checkpoint.load_optimizer=false"],
    )
    assert_resume_kept_the_loaded_weights(ranks, lr)


def test_tracker_problems_name_the_file(tmp_path):
    from hpd_megatron.checkpoint.training_state import CheckpointError, latest_step

    assert latest_step(tmp_path) is None
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("soon\n")
    with pytest.raises(CheckpointError, match=f"{tracker}: expected a step number, found 'soon'"):
        latest_step(tmp_path)
    tracker.write_text("40\n")
    with pytest.raises(
        CheckpointError,
        match=rf"{tracker}: names step 40 but {tmp_path}/iter_0000040 "
        "is missing or incomplete",
    ):
        latest_step(tmp_path)
    (tmp_path / "iter_0000040").mkdir()
    (tmp_path / "iter_0000040" / "metadata.json").write_text("{}")
    assert latest_step(tmp_path) == 40


def _train_until_signal(recipe: str, overrides: list[str], signal_during_step: int) -> dict:
    """Rank 0 sends itself SIGTERM during that step; all ranks must stop after it."""
    import os
    import signal

    from hpd_megatron.checkpoint.signals import StopRequested
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    class SignalledTrainer(DistillationTrainer):
        def train_step(self, step):
            if step == signal_during_step and torch.distributed.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # a second one must change nothing
            return super().train_step(step)

    trainer = SignalledTrainer(load_run_config(recipe, overrides))
    try:
        trainer.train()
    except StopRequested as stopped:
        return {"stopped_after": stopped.step}
    finally:
        trainer.close()
    return {"stopped_after": None}


def test_sigterm_saves_at_the_step_boundary_and_resume_continues(setup):
    run_dir = setup["root"] / "signalled"
    overrides = ["schedule.train_steps=6", f"run_dir={run_dir}"]
    outcome = run_on_ranks(
        _train_until_signal,
        2,
        setup["recipe"],
        overrides + ["parallel.tensor_model_parallel_size=2"],
        2,
    )
    assert [o["stopped_after"] for o in outcome] == [2, 2], "every rank stops after the same step"
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    resumed = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], overrides))
    assert [h["step"] for h in resumed] == [3, 4, 5, 6]
    straight = logged(
        run_on_ranks(
            train_on_rank,
            1,
            setup["recipe"],
            ["schedule.train_steps=6", f"run_dir={setup['root'] / 'unsignalled'}"],
        )
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6], "each step exactly once"
    for expected, got in zip(straight, lines):
        # Steps 1-2 ran at TP2, 3-6 resumed at TP1: the same sequence, to fp32 rounding.
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4), got["step"]


def _train_with_nan_steps(recipe: str, overrides: list[str], nan_steps: list[int]) -> dict:
    """Make the loss NaN in the given steps, through an objective that poisons it."""
    from hpd_megatron.errors import NonFiniteTraining
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.objective import DistillationObjective
    from hpd_megatron.training.trainer import DistillationTrainer

    class PoisonedObjective(DistillationObjective):
        def compute_loss(self, step, batch, teacher_logits, logits):
            loss, diagnostics = super().compute_loss(step, batch, teacher_logits, logits)
            return (loss * float("nan") if step in nan_steps else loss), diagnostics

    class PoisonedTrainer(DistillationTrainer):
        def build_objective(self):
            return PoisonedObjective(self.run, self.student_description.vocab_size)

    trainer = PoisonedTrainer(load_run_config(recipe, overrides))
    try:
        return {"history": trainer.train(), "error": None}
    except NonFiniteTraining as error:
        return {"history": None, "error": str(error)}
    finally:
        trainer.close()


def test_nonfinite_steps_are_skipped_then_stop_the_run(setup):
    root = setup["root"]
    clean = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], [f"run_dir={root / 'finite'}"]))
    skipped = run_on_ranks(
        _train_with_nan_steps, 1, setup["recipe"], [f"run_dir={root / 'one_nan'}"], [2]
    )[0]["history"]
    assert [h["skipped_steps"] for h in skipped] == [0, 1, 1]
    assert skipped[0]["loss"] == clean[0]["loss"]
    # The skipped step 2 did not advance the schedule: step 3 runs at the clean run's step-2 lr.
    assert skipped[2]["lr"] == clean[1]["lr"], "a skipped step does not advance the LR schedule"
    failed = run_on_ranks(
        _train_with_nan_steps,
        1,
        setup["recipe"],
        [
            f"run_dir={root / 'nans'}",
            "optimizer.max_consecutive_nonfinite=2",
            "checkpoint.save_interval=1",
        ],
        [2, 3],
    )[0]
    assert failed["error"].startswith("steps 2..3: loss or gradients not finite 2 times in a row")
    # Step 2 was skipped, so its checkpoint holds good (step-1) weights; the failing step 3
    # saves nothing.
    assert (
        root / "nans" / "checkpoints" / "latest_checkpointed_iteration.txt"
    ).read_text() == "2\n"


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(setup, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = setup["root"] / "killed"
    overrides = [
        "schedule.train_steps=6",
        "checkpoint.save_interval=2",
        "parallel.tensor_model_parallel_size=2",
        f"run_dir={run_dir}",
    ]
    root = Path(__file__).resolve().parent.parent
    marker = f"kill-test-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", HPD_TEST_MARKER=marker)
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        killed = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(free_port()),
                str(root / "tests" / "kill_during_save.py"),
                "4",
                "--config",
                setup["recipe"],
                *overrides,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            killed.wait(timeout=600)
        finally:
            _reap_marked_processes(marker)
    assert killed.returncode != 0, log.read_text()[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    assert (checkpoints / "iter_0000004.partial").is_dir(), "the kill came mid-save"
    assert not (checkpoints / "iter_0000004").exists()

    resumed = logged(run_on_ranks(train_on_rank, 2, setup["recipe"], overrides))
    assert [h["step"] for h in resumed] == [3, 4, 5, 6], "resumed from step 2"
    assert not (checkpoints / "iter_0000004.partial").exists(), "the next save cleans up"
    straight = logged(
        run_on_ranks(
            train_on_rank,
            2,
            setup["recipe"],
            [
                "schedule.train_steps=6",
                "parallel.tensor_model_parallel_size=2",
                f"run_dir={setup['root'] / 'not_killed'}",
            ],
        )
    )
    for expected, got in zip(straight[2:], resumed):
        assert got["loss"] == expected["loss"], got["step"]


def _reap_marked_processes(marker: str) -> None:
    """Kill what a SIGKILLed rank left behind (Megatron's writer starts a multiprocessing
    manager that outlives its parent; on a cluster, Slurm's cgroup would reap it)."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.environ().get("HPD_TEST_MARKER") == marker:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def _load_student(directory: str, model: dict) -> str:
    """Load a checkpoint into a student of the given shape; return the error message, if any."""
    from hpd_megatron.checkpoint.verify import CheckpointError
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    description = ModelDescription.from_dict(model)
    try:
        load_model_weights(build_gpt_model(description, transformer_config(description)), directory)
        return ""
    except CheckpointError as error:
        return str(error)
    finally:
        destroy_parallel()


def test_damaged_or_foreign_checkpoints_name_the_file_and_the_problem(setup, tmp_path):
    from hpd_megatron.checkpoint.verify import CheckpointError, read_index

    original = setup["root"] / "init" / "student"
    read_index(original)  # whole
    copy = tmp_path / "student"
    shutil.copytree(original, copy)
    data_file = sorted(copy.glob("*.distcp"))[0]
    size = data_file.stat().st_size
    with open(data_file, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(
        CheckpointError,
        match=rf"{data_file}: truncated \({size // 2} bytes, "
        rf"the index needs \d+\)",
    ):
        read_index(copy)
    data_file.unlink()
    with pytest.raises(CheckpointError, match=rf"{data_file}: missing \(the index names it\)"):
        read_index(copy)
    (copy / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=rf"{copy / '.metadata'}: unreadable"):
        read_index(copy)

    wider = dict(STUDENT, ffn_hidden_size=160)
    message = run_on_ranks(_load_student, 1, str(original), wider)[0]
    assert message == (
        f"{original}: tensor 'decoder.layers.mlp.linear_fc1.weight' has shape "
        "[2, 256, 64] in the checkpoint but [2, 320, 64] in this model "
        "(another model shape)"
    )
    deeper = dict(STUDENT, num_layers=3)
    assert (
        "has shape [2, 64] in the checkpoint but [3, 64] in this model"
        in run_on_ranks(_load_student, 1, str(original), deeper)[0]
    )
    assert run_on_ranks(_load_student, 1, str(original), STUDENT)[0] == ""


def test_resume_on_other_layouts_and_optimizers(setup):
    """DP2 with the distributed optimizer stops after step 2; other layouts continue it.

    Two resumed steps: the second one's loss shows the first resumed update, which is
    where a wrong Adam step count (bias correction) would show."""
    root = setup["root"]
    base = ["schedule.train_steps=4", "optimizer.use_distributed_optimizer=true"]
    straight = logged(
        run_on_ranks(train_on_rank, 2, setup["recipe"], base + [f"run_dir={root / 'dp2_straight'}"])
    )
    stopped = {}
    for optimizer_format in ("fully_reshardable", "dp_reshardable"):
        stopped[optimizer_format] = root / f"dp2_stopped_{optimizer_format}"
        logged(
            run_on_ranks(
                train_on_rank,
                2,
                setup["recipe"],
                base
                + [
                    f"run_dir={stopped[optimizer_format]}",
                    "schedule.exit_interval=2",
                    f"checkpoint.optimizer_format={optimizer_format}",
                ],
            )
        )

    def resume(
        name: str, ranks: int, optimizer_format: str, overrides: list[str], body=train_on_rank
    ):
        checkpoints = root / f"resumed_{name}"
        shutil.copytree(stopped[optimizer_format] / "checkpoints", checkpoints)
        return run_on_ranks(
            body,
            ranks,
            setup["recipe"],
            base + overrides + [f"run_dir={root / name}", f"checkpoint.dir={checkpoints}"],
        ), checkpoints

    for name, ranks, optimizer_format, layout in (
        ("tp2", 2, "fully_reshardable", ["parallel.tensor_model_parallel_size=2"]),
        ("pp2", 2, "fully_reshardable", ["parallel.pipeline_model_parallel_size=2"]),
        ("dp1", 1, "dp_reshardable", []),
    ):
        resumed = logged(resume(name, ranks, optimizer_format, layout)[0])
        assert [h["step"] for h in resumed] == [3, 4]
        for expected, got in zip(straight[2:], resumed):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(expected[key], rel=1e-4), (name, got["step"], key)

    # What the format cannot do, and another optimizer kind: one clear message each.
    failed, checkpoints = resume(
        "dp_tp2",
        2,
        "dp_reshardable",
        ["parallel.tensor_model_parallel_size=2"],
        _train_expecting_error,
    )
    assert failed[0] == (
        f"{checkpoints}/iter_0000002: the distributed optimizer's state was saved "
        "in the dp_reshardable format at TP1 PP1 and cannot be resharded to TP2 "
        "PP1; resume at that TP x PP (any DP), or set checkpoint.load_optimizer="
        "false to restart the Adam moments from zero (save with "
        "checkpoint.optimizer_format=fully_reshardable to avoid this)"
    )
    plain = ["optimizer.use_distributed_optimizer=false"]
    failed, checkpoints = resume("plain", 1, "fully_reshardable", plain, _train_expecting_error)
    assert failed[0] == (
        f"{checkpoints}/iter_0000002: the optimizer state was saved with "
        "optimizer.use_distributed_optimizer=true; resume with that setting, or "
        "set checkpoint.load_optimizer=false to keep the weights, schedule and "
        "data position and restart the Adam moments from zero"
    )
    fresh_moments = logged(
        resume("fresh", 1, "fully_reshardable", plain + ["checkpoint.load_optimizer=false"])[0]
    )
    assert [h["step"] for h in fresh_moments] == [3, 4]
    # Same weights and data, so the same loss; only the update differs (fresh moments).
    assert fresh_moments[0]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-4)


def _train_expecting_error(recipe: str, overrides: list[str]) -> str:
    from hpd_megatron.checkpoint.verify import CheckpointError
    from hpd_megatron.train import load_run_config, train

    try:
        train(load_run_config(recipe, overrides))
    except CheckpointError as error:
        return str(error)
    return ""


def test_load_starts_the_student_from_an_export_or_another_runs_checkpoint(setup):
    """checkpoint.load takes a model-only export or a training checkpoint root alike."""
    import yaml

    root = setup["root"]
    source = root / "load_source"
    logged(
        run_on_ranks(
            train_on_rank,
            1,
            setup["recipe"],
            [
                "schedule.train_steps=2",
                f"run_dir={source}",
                "checkpoint.save_interval=2",
                f"checkpoint.export_dir={source / 'export'}",
            ],
        )
    )
    description = yaml.safe_load((source / "export" / "model.yaml").read_text())
    assert {key: description[key] for key in STUDENT} == STUDENT
    exported = run_on_ranks(read_student, 1, str(source / "export"))[0]
    from_training = run_on_ranks(read_student, 1, str(source / "checkpoints"))[0]
    initial = run_on_ranks(read_student, 1, str(root / "init" / "student"))[0]
    assert all(torch.equal(exported[k], from_training[k]) for k in exported)
    assert not all(torch.equal(exported[k], initial[k]) for k in exported)

    runs = {}
    for name, path in (("export", source / "export"), ("training", source / "checkpoints")):
        runs[name] = logged(
            run_on_ranks(
                train_on_rank,
                1,
                setup["recipe"],
                [
                    "schedule.train_steps=1",
                    "schedule.warmup_steps=0",
                    f"run_dir={root / ('from_' + name)}",
                    f"checkpoint.load={path}",
                ],
            )
        )
    assert runs["export"][0]["step"] == 1 and runs["training"][0]["step"] == 1
    assert runs["export"][0]["loss"] == runs["training"][0]["loss"]


def test_the_command_line_exits_75_on_sigterm_after_saving(setup, tmp_path):
    """What the Slurm templates see: SIGTERM to the launcher's process, exit code 75."""
    import signal
    import subprocess
    import sys
    import time

    from hpd_megatron.checkpoint.signals import STOP_EXIT_CODE

    run_dir = tmp_path / "cli"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpd_megatron.train",
            "--config",
            setup["recipe"],
            "schedule.train_steps=200",
            f"run_dir={run_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A single process rendezvouses on 29500 by default, which another job may hold.
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == STOP_EXIT_CODE == 75, output[-2000:]
    saved = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert saved == metrics.read_text().count("\n"), "the checkpoint is of the last step run"
    assert f"stopped by a signal after step {saved}; the checkpoint is complete" in output
