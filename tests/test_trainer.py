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


def test_teacher_and_student_vocabularies_must_match():
    from hpd_megatron.config import ConfigError
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.components import check_shared_vocabulary

    with pytest.raises(
        ConfigError, match="teacher.model.vocab_size 256 != student.model.vocab_size 128"
    ):
        check_shared_vocabulary(
            ModelDescription.from_dict(STUDENT),
            ModelDescription.from_dict(dict(TEACHER, vocab_size=256)),
        )


def test_data_tokenizer_must_match_the_student(prepared_data):
    from hpd_megatron.data import DataError
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.feed import TrainingFeed

    run = _run_config(prepared_data)
    student = ModelDescription.from_dict(dict(STUDENT, vocab_size=200))
    with pytest.raises(
        DataError,
        match=r"train.json: the data's tokenizer has 128 tokens but "
        r"student.model.vocab_size is 200",
    ):
        TrainingFeed(run, student, dp_rank=0, dp_size=1)


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
