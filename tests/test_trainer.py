"""The distillation trainer: the same losses at every layout, a frozen teacher, a falling loss."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.multiprocess import run_on_ranks
from tests.training_runs import SEQ, STEPS, STUDENT, TEACHER, logged, train_on_rank

LAYOUTS = {
    "TP1 PP1": (1, []),
    "TP2 PP1": (2, ["parallel.tensor_model_parallel_size=2"]),
    "TP1 PP2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "TP2 PP2": (
        4,
        ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
    ),
    "TP2 PP2 fused head": (
        4,
        [
            "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=2",
            "loss.fused_head=true",
        ],
    ),
    "DP2": (2, []),
    "DP2 distributed optimizer": (2, ["optimizer.use_distributed_optimizer=true"]),
    "micro-batch 1": (1, ["schedule.micro_batch_size=1"]),
}


@pytest.fixture(scope="module")
def histories(setup) -> dict[str, list[dict]]:
    out = {}
    for name, (ranks, overrides) in LAYOUTS.items():
        run_dir = f"run_dir={setup['root'] / name.replace(' ', '_')}"
        out[name] = logged(
            run_on_ranks(train_on_rank, ranks, setup["recipe"], overrides + [run_dir])
        )
    return out


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1 PP1"])
def test_first_steps_agree_across_layouts(histories, layout):
    reference, other = histories["TP1 PP1"], histories[layout]
    assert [h["step"] for h in other] == list(range(1, STEPS + 1))
    for ref, got in zip(reference, other):
        for key in ("loss", "cross_entropy", "grad_norm", "hpd/sample_differs"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (
                layout,
                ref["step"],
                key,
            )
        assert got["supervised_tokens"] == ref["supervised_tokens"]


def test_fused_head_trains_as_the_output_layers_do(histories):
    """loss.fused_head at TP2 x PP2: the same 3 steps as the materialised logits (1e-6)."""
    reference, fused = histories["TP2 PP2"], histories["TP2 PP2 fused head"]
    assert len(fused) == len(reference) == STEPS
    for ref, got in zip(reference, fused):
        for key in ("loss", "cross_entropy", "grad_norm", "hpd/sample_differs"):
            assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (ref["step"], key)


def test_metrics_file_and_resolved_config(setup, histories):
    run_dir = setup["root"] / "TP2_PP2"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert {
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "peak_memory_gb",
        "hpd/a_negative",
        "hpd/b_active",
        "hpd/m1_and_m2",
    } <= set(lines[0])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["tensor_model_parallel_size"] == 2
    assert resolved["loss"]["method"] == "hpd"


def test_student_learns(setup):
    overrides = [
        "schedule.train_steps=12",
        "optimizer.lr=1.0e-2",
        "loss.method=fkl",
        f"run_dir={setup['root'] / 'learn'}",
    ]
    history = logged(run_on_ranks(train_on_rank, 1, setup["recipe"], overrides))
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert last["cross_entropy"] < first["cross_entropy"]


# ---------------------------------------------------------------- bad input, before any work


def _run_config(prepared_data: str, **changes):
    from hpd_megatron.config import from_dict
    from hpd_megatron.training.config import RunConfig

    raw = {
        "student": {"model": STUDENT},
        "teacher": {"model": TEACHER},
        "data": {"train": prepared_data, "seq_length": SEQ},
        "schedule": {"global_batch_size": 4, "micro_batch_size": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return from_dict(RunConfig, raw)


def test_missing_data_names_the_path(prepared_data, tmp_path):
    from hpd_megatron.data import DataError
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.feed import TrainingFeed

    missing = str(tmp_path / "nowhere" / "train")
    run = _run_config(prepared_data, data__train=missing)
    with pytest.raises(DataError, match=f"{missing}.json: no such file"):
        TrainingFeed(run, ModelDescription.from_dict(STUDENT), dp_rank=0, dp_size=1)
    run = _run_config(prepared_data, data__train="")
    with pytest.raises(DataError, match="data.train: no prepared data given"):
        TrainingFeed(run, ModelDescription.from_dict(STUDENT), dp_rank=0, dp_size=1)


def test_command_line_reports_bad_input_in_one_line(prepared_data, tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "student": {"model": STUDENT},
                "loss": {"method": "sft"},
                "data": {"train": str(tmp_path / "missing")},
            }
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpd_megatron.train",
            "--config",
            str(recipe),
            f"run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.train: {tmp_path / 'missing'}.json: no such file "
        "(write the dataset with tools/prepare_data.py)"
    )
    assert "Traceback" not in result.stderr


# Everything of the performance section that the CPU can run, against the plain run.
ON_THE_CPU = [
    "optimizer.use_distributed_optimizer=true",
    "performance.overlap_grad_reduce=true",
    "performance.overlap_param_gather=true",
    "performance.recompute_granularity=full",
    "performance.recompute_num_layers=1",
    "performance.deallocate_pipeline_outputs=true",
    "performance.fully_parallel_save=true",
    "performance.fully_parallel_load=true",
]
PLAIN = [
    "optimizer.use_distributed_optimizer=true",
    "performance.deallocate_pipeline_outputs=false",
    "performance.fully_parallel_save=false",
]
TP1_PP2_DP2 = ["parallel.pipeline_model_parallel_size=2", "schedule.train_steps=4"]


def _train_reporting_settings(recipe: str, overrides: list[str]) -> dict:
    """Train; report the settings the built models, DDP wrapper and optimizer received."""
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    class SettingsTrainer(DistillationTrainer):
        def build_models(self, resuming: bool):
            models = super().build_models(resuming)
            student, teacher = models.student.module.config, models.pair.teacher.config
            fields = (
                "sequence_parallel",
                "apply_rope_fusion",
                "recompute_granularity",
                "recompute_num_layers",
                "deallocate_pipeline_outputs",
            )
            self.settings = {
                "student": {name: getattr(student, name) for name in fields},
                "teacher": {name: getattr(teacher, name) for name in fields},
                "ddp": {
                    name: getattr(models.student.ddp_config, name)
                    for name in ("overlap_grad_reduce", "overlap_param_gather")
                },
            }
            return models

    trainer = SettingsTrainer(load_run_config(recipe, overrides))
    try:
        history = trainer.train()
        trainer.settings["optimizer_overlap_param_gather"] = (
            trainer.optimizer.config.overlap_param_gather
        )
    finally:
        trainer.close()
    return {"history": history, "settings": trainer.settings, "teacher_unchanged": True}


def test_cpu_settings_reach_both_models_and_keep_the_losses_exact(setup):
    def launch(name: str, overrides: list[str]) -> list[dict]:
        run = TP1_PP2_DP2 + overrides + [f"run_dir={setup['root'] / name}"]
        return run_on_ranks(_train_reporting_settings, 4, setup["recipe"], run)

    plain = logged(launch("plain", PLAIN))
    stopped = launch("tuned", ON_THE_CPU + ["schedule.exit_interval=2"])
    resumed = logged(launch("tuned", ON_THE_CPU))
    settings = stopped[0]["settings"]
    assert settings["student"] == {
        "sequence_parallel": False,
        "apply_rope_fusion": False,
        "recompute_granularity": "full",
        "recompute_num_layers": 1,
        "deallocate_pipeline_outputs": True,
    }
    assert settings["teacher"]["recompute_granularity"] is None
    assert settings["ddp"] == {"overlap_grad_reduce": True, "overlap_param_gather": True}
    assert settings["optimizer_overlap_param_gather"]
    tuned = logged(stopped) + resumed
    assert [h["step"] for h in tuned] == [1, 2, 3, 4]
    for expected, got in zip(plain, tuned):
        for key in ("loss", "cross_entropy", "grad_norm", "lr"):
            assert got[key] == expected[key], (got["step"], key, got[key], expected[key])
