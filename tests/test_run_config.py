"""Recipes map onto RunConfig; overrides and errors name the dotted key."""

from __future__ import annotations

import pytest
import yaml

from hpd_megatron.errors import ConfigError
from hpd_megatron.training.config import apply_overrides, load_run_config

TINY = dict(
    family="llama",
    num_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    ffn_hidden_size=64,
    vocab_size=100,
)


@pytest.fixture
def recipe(tmp_path):
    def write(**sections):
        raw = {"student": {"model": TINY}, "teacher": {"model": dict(TINY, num_layers=4)}}
        raw.update(sections)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def test_overrides_reach_nested_sections(recipe):
    run = load_run_config(
        recipe(),
        [
            "loss.method=fkl",
            "schedule.train_steps=17",
            "parallel.tensor_model_parallel_size=2",
            "optimizer.lr=3e-4",
            "teacher.checkpoint=/ckpt/teacher",
        ],
    )
    assert run.loss.method == "fkl" and run.schedule.train_steps == 17
    assert run.parallel.tensor_model_parallel_size == 2 and run.optimizer.lr == 3e-4
    assert run.teacher.checkpoint == "/ckpt/teacher"
    assert run.student.description("student").num_layers == 2


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["loss.methd=fkl"], "loss.methd: unknown key"),
        (
            ["loss.method=kl"],
            "loss.method: expected one of hpd, fkl, rkl, skl, srkl, tvd, jsd, sft, opd, got 'kl'",
        ),
        (["schedule.train_steps=many"], "schedule.train_steps: expected an integer, got 'many'"),
        (["schedule.micro_batch_size=0"], "schedule.micro_batch_size: must be >= 1"),
        (["params_dtype=fp16"], "params_dtype: expected one of fp32, bf16, got 'fp16'"),
        (["teacher=null"], "teacher: loss.method 'hpd' needs a teacher"),
        (["student.model.num_layers=x"], "student.model.num_layers: expected an integer"),
        (["lossmethod"], "expected dotted.key=value"),
        (["student.model.family.x=1"], "student.model.family is not a section"),
        (["optimizer.lr=fast"], "optimizer.lr: expected a number, got 'fast'"),
        (
            ["parallel.context_parallel_size=2"],
            "parallel.context_parallel_size: 2 is not supported yet (batches are not split",
        ),
        (
            ["schedule.train_steps=4", "schedule.warmup_steps=4"],
            "schedule.warmup_steps: must be in [0, schedule.train_steps), got 4 with train_steps 4",
        ),
    ],
)
def test_errors_name_the_key(recipe, overrides, expected):
    path = recipe()
    with pytest.raises(ConfigError) as error:
        load_run_config(path, overrides)
    assert expected in str(error.value)


def test_sft_needs_no_teacher(recipe):
    run = load_run_config(recipe(), ["loss.method=sft", "teacher=null"])
    assert run.teacher is None


def test_global_batch_must_split_into_micro_batches(recipe):
    run = load_run_config(recipe(), ["schedule.global_batch_size=8", "schedule.micro_batch_size=2"])
    assert run.micro_batches_per_step(2) == 2 and run.micro_batches_per_step(4) == 1
    with pytest.raises(ConfigError, match="8 is not a multiple of micro_batch_size x DP = 2 x 3"):
        run.micro_batches_per_step(3)


def test_apply_overrides_parses_yaml_values():
    raw = apply_overrides({}, ["a.b=1", "a.c=[1, 2]", "d=true", "e=text"])
    assert raw == {"a": {"b": 1, "c": [1, 2]}, "d": True, "e": "text"}
