"""The distillation trainer: the same losses at every layout, a frozen teacher, a falling loss.

All runs start from the same initial weights (saved once at TP1 PP1 and loaded through
dist_checkpointing) and read the same prepared data; only the layout changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.multiprocess import run_on_ranks

STEPS = 3
SEQ = 96
STUDENT = dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
               num_query_groups=2, ffn_hidden_size=128, vocab_size=128)
TEACHER = dict(family="qwen2", num_layers=4, hidden_size=96, num_attention_heads=4,
               num_query_groups=2, ffn_hidden_size=192, vocab_size=128)


def _save_initial_weights(directory: str) -> None:
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=3)
    for name, kwargs in (("student", STUDENT), ("teacher", TEACHER)):
        description = ModelDescription.from_dict(kwargs)
        save_model_weights(build_gpt_model(description, transformer_config(description)),
                           Path(directory) / name)
    destroy_parallel()


def _train(recipe: str, overrides: list[str]) -> dict:
    """Train on this rank; also report whether the teacher's weights stayed bit-identical."""
    import hpd_megatron.train as trainer

    captured = {}
    build_models = trainer.build_models

    def build_and_capture(*args, **kwargs):
        models = build_models(*args, **kwargs)
        captured["models"] = models
        captured["teacher_before"] = {k: v.detach().clone()
                                      for k, v in models.pair.teacher.state_dict().items()
                                      if isinstance(v, torch.Tensor)}
        return models

    trainer.build_models = build_and_capture
    history = trainer.train(trainer.load_run_config(recipe, overrides))
    after = {k: v for k, v in captured["models"].pair.teacher.state_dict().items()
             if isinstance(v, torch.Tensor)}
    unchanged = all(torch.equal(after[k], v) for k, v in captured["teacher_before"].items())
    return {"history": history, "teacher_unchanged": unchanged}


def _logged(results: list[dict]) -> list[dict]:
    histories = [r["history"] for r in results if r["history"]]
    assert len(histories) == 1, "exactly one rank logs"
    assert all(r["teacher_unchanged"] for r in results)
    return histories[0]


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> str:
    """The arithmetic task, a SentencePiece tokenizer trained on it, and its indexed data."""
    from hpd_megatron.data import prepare
    from hpd_megatron.data.arithmetic import write_task

    root = tmp_path_factory.mktemp("data")
    write_task(root, num_train=64, num_test=8, seed=0, max_digits=2,
               tokenizer_vocab_size=STUDENT["vocab_size"])
    prefix = root / "train"
    prepare(root / "train.jsonl", root / "tokenizer.model", prefix, seq_length=SEQ, log=lambda *_: None)
    return str(prefix)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepared_data) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    run_on_ranks(_save_initial_weights, 1, str(root / "init"))
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"),
        "seed": 7,
        "student": {"model": STUDENT, "checkpoint": str(root / "init" / "student")},
        "teacher": {"model": TEACHER, "checkpoint": str(root / "init" / "teacher")},
        "data": {"train": prepared_data, "seq_length": SEQ},
        "loss": {"method": "hpd"},
        "optimizer": {"lr": 2.0e-3, "weight_decay": 0.0},
        "schedule": {"train_steps": STEPS, "warmup_steps": 1, "global_batch_size": 4,
                     "micro_batch_size": 2},
    }))
    return {"root": root, "recipe": str(recipe)}


LAYOUTS = {
    "TP1 PP1": (1, []),
    "TP2 PP1": (2, ["parallel.tensor_model_parallel_size=2"]),
    "TP1 PP2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "TP2 PP2": (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
    "DP2": (2, []),
    "DP2 distributed optimizer": (2, ["optimizer.use_distributed_optimizer=true"]),
    "micro-batch 1": (1, ["schedule.micro_batch_size=1"]),
    "micro-batch 4": (1, ["schedule.micro_batch_size=4"]),
}


@pytest.fixture(scope="module")
def histories(setup) -> dict[str, list[dict]]:
    out = {}
    for name, (ranks, overrides) in LAYOUTS.items():
        run_dir = f"run_dir={setup['root'] / name.replace(' ', '_')}"
        out[name] = _logged(run_on_ranks(_train, ranks, setup["recipe"], overrides + [run_dir]))
    return out


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1 PP1"])
def test_first_steps_agree_across_layouts(histories, layout):
    reference, other = histories["TP1 PP1"], histories[layout]
    assert [h["step"] for h in other] == list(range(1, STEPS + 1))
    for ref, got in zip(reference, other):
        for key in ("loss", "cross_entropy", "grad_norm", "hpd/sample_differs"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, ref["step"], key)
        assert got["supervised_tokens"] == ref["supervised_tokens"]


def test_metrics_file_and_resolved_config(setup, histories):
    run_dir = setup["root"] / "TP2_PP2"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_memory_gb",
            "hpd/a_negative", "hpd/b_active", "hpd/m1_and_m2"} <= set(lines[0])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["tensor_model_parallel_size"] == 2
    assert resolved["loss"]["method"] == "hpd"


def test_student_learns(setup):
    overrides = ["schedule.train_steps=12", "optimizer.lr=1.0e-2", "loss.method=fkl",
                 f"run_dir={setup['root'] / 'learn'}"]
    history = _logged(run_on_ranks(_train, 1, setup["recipe"], overrides))
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert last["cross_entropy"] < first["cross_entropy"]


# ---------------------------------------------------------------- bad input, before any work


def _run_config(prepared_data: str, **changes):
    from hpd_megatron.config import from_dict
    from hpd_megatron.training.config import RunConfig

    raw = {"student": {"model": STUDENT}, "teacher": {"model": TEACHER},
           "data": {"train": prepared_data, "seq_length": SEQ},
           "schedule": {"global_batch_size": 4, "micro_batch_size": 2}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return from_dict(RunConfig, raw)


def test_teacher_and_student_vocabularies_must_match():
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.components import check_shared_vocabulary

    with pytest.raises(ValueError, match="teacher.model.vocab_size 256 != student.model.vocab_size 128"):
        check_shared_vocabulary(ModelDescription.from_dict(STUDENT),
                                ModelDescription.from_dict(dict(TEACHER, vocab_size=256)))


def test_data_tokenizer_must_match_the_student(prepared_data):
    from hpd_megatron.data import DataError
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.feed import TrainingFeed

    run = _run_config(prepared_data)
    student = ModelDescription.from_dict(dict(STUDENT, vocab_size=200))
    with pytest.raises(DataError, match=r"train.json: the data's tokenizer has 128 tokens but "
                                        r"student.model.vocab_size is 200"):
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
    recipe.write_text(yaml.safe_dump({"student": {"model": STUDENT}, "loss": {"method": "sft"},
                                      "data": {"train": str(tmp_path / "missing")}}))
    result = subprocess.run([sys.executable, "-m", "hpd_megatron.train", "--config", str(recipe),
                             f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'missing'}.json: no such file (write the dataset with tools/prepare_data.py)")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- checkpoints and exact resume


def _read_student(directory: str) -> dict[str, torch.Tensor]:
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    description = ModelDescription.from_dict(STUDENT)
    model = build_gpt_model(description, transformer_config(description))
    load_model_weights(model, directory)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    destroy_parallel()
    return weights


def test_stop_and_resume_continues_exactly_at_tp2_pp2(setup):
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
              "schedule.train_steps=6"]
    straight_dir, resumed_dir = setup["root"] / "straight", setup["root"] / "resumed"
    straight = _logged(run_on_ranks(_train, 4, setup["recipe"], layout + [
        f"run_dir={straight_dir}", f"checkpoint.export_dir={straight_dir / 'export'}"]))
    resumed_run = layout + [f"run_dir={resumed_dir}", "checkpoint.save_interval=3",
                            f"checkpoint.export_dir={resumed_dir / 'export'}"]
    first = _logged(run_on_ranks(_train, 4, setup["recipe"], resumed_run + ["schedule.exit_interval=3"]))
    assert [h["step"] for h in first] == [1, 2, 3]
    assert (resumed_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    assert not (resumed_dir / "export").exists(), "a stopped run exports nothing"
    second = _logged(run_on_ranks(_train, 4, setup["recipe"], resumed_run))
    assert [h["step"] for h in second] == [4, 5, 6]
    for expected, got in zip(straight, first + second):
        for key in ("loss", "cross_entropy", "grad_norm", "lr", "hpd/sample_differs"):
            assert got[key] == expected[key], (got["step"], key, got[key], expected[key])
    a = run_on_ranks(_read_student, 1, str(straight_dir / "export"))[0]
    b = run_on_ranks(_read_student, 1, str(resumed_dir / "export"))[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


def test_tracker_problems_name_the_file(tmp_path):
    from hpd_megatron.checkpoint.training_state import CheckpointError, latest_step

    assert latest_step(tmp_path) is None
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("soon\n")
    with pytest.raises(CheckpointError, match=f"{tracker}: expected a step number, found 'soon'"):
        latest_step(tmp_path)
    tracker.write_text("40\n")
    with pytest.raises(CheckpointError, match=rf"{tracker}: names step 40 but {tmp_path}/iter_0000040 "
                                              "is missing or incomplete"):
        latest_step(tmp_path)
    (tmp_path / "iter_0000040").mkdir()
    (tmp_path / "iter_0000040" / "metadata.json").write_text("{}")
    assert latest_step(tmp_path) == 40


def _train_until_signal(recipe: str, overrides: list[str], signal_during_step: int) -> dict:
    """Rank 0 sends itself SIGTERM while fetching that step's data; all ranks must stop."""
    import os
    import signal

    import hpd_megatron.train as trainer
    from hpd_megatron.checkpoint.signals import StopRequested

    fetch = trainer.TrainingFeed.next_step
    calls = {"n": 0}

    def fetch_and_signal(self):
        calls["n"] += 1
        if calls["n"] == signal_during_step and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one must change nothing
        return fetch(self)

    trainer.TrainingFeed.next_step = fetch_and_signal
    try:
        trainer.train(trainer.load_run_config(recipe, overrides))
    except StopRequested as stopped:
        return {"stopped_after": stopped.step}
    return {"stopped_after": None}


def test_sigterm_saves_at_the_step_boundary_and_resume_continues(setup):
    run_dir = setup["root"] / "signalled"
    overrides = ["schedule.train_steps=6", f"run_dir={run_dir}"]
    outcome = run_on_ranks(_train_until_signal, 2, setup["recipe"],
                           overrides + ["parallel.tensor_model_parallel_size=2"], 2)
    assert [o["stopped_after"] for o in outcome] == [2, 2], "every rank stops after the same step"
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    resumed = _logged(run_on_ranks(_train, 1, setup["recipe"], overrides))
    assert [h["step"] for h in resumed] == [3, 4, 5, 6]
    straight = _logged(run_on_ranks(_train, 1, setup["recipe"], [
        "schedule.train_steps=6", f"run_dir={setup['root'] / 'unsignalled'}"]))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2, 3, 4, 5, 6], "each step exactly once"
    for expected, got in zip(straight, logged):
        # Steps 1-2 ran at TP2, 3-6 resumed at TP1: the same sequence, to fp32 rounding.
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4), got["step"]


def _train_with_nan_steps(recipe: str, overrides: list[str], nan_steps: list[int]) -> dict:
    """Make the loss NaN in the given steps (2 micro-batches a step in this recipe)."""
    import hpd_megatron.train as trainer
    import hpd_megatron.training.components as components

    loss_fn = components.distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, diagnostics = loss_fn(*args, **kwargs)
        if (calls["n"] + 1) // 2 in nan_steps:
            loss = loss * float("nan")
        return loss, diagnostics

    components.distillation_loss = poisoned
    try:
        return {"history": trainer.train(trainer.load_run_config(recipe, overrides)), "error": None}
    except trainer.NonFiniteTraining as error:
        return {"history": None, "error": str(error)}


def test_nonfinite_steps_are_skipped_then_stop_the_run(setup):
    root = setup["root"]
    clean = _logged(run_on_ranks(_train, 1, setup["recipe"], [f"run_dir={root / 'finite'}"]))
    skipped = run_on_ranks(_train_with_nan_steps, 1, setup["recipe"],
                           [f"run_dir={root / 'one_nan'}"], [2])[0]["history"]
    assert [h["skipped_steps"] for h in skipped] == [0, 1, 1]
    assert skipped[0]["loss"] == clean[0]["loss"]
    # The skipped step 2 did not advance the schedule: step 3 runs at the clean run's step-2 lr.
    assert skipped[2]["lr"] == clean[1]["lr"], "a skipped step does not advance the LR schedule"
    failed = run_on_ranks(_train_with_nan_steps, 1, setup["recipe"],
                          [f"run_dir={root / 'nans'}", "optimizer.max_consecutive_nonfinite=2",
                           "checkpoint.save_interval=1"], [2, 3])[0]
    assert failed["error"].startswith("steps 2..3: loss or gradients not finite 2 times in a row")
    # Step 2 was skipped, so its checkpoint holds good (step-1) weights; the failing step 3
    # saves nothing.
    assert (root / "nans" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "2\n"
