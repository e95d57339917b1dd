"""Bad inputs get one line naming the file/key, and leave nothing deleted or half-written.

Each case feeds one bad input to the product's own entry point (the recipe loader, the model
description reader, the HF converter's tool, the study's output set-up, the Slurm
environment, the MLflow tracker) and checks the exact message and that the directory it
worked in holds what it held before (nothing deleted, no ``.partial`` left). The table in
the docs lists the same cases.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from hpd_megatron.config import load_yaml
from hpd_megatron.data.tokenizer import load_tokenizer
from hpd_megatron.errors import ConfigError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.study.experiment import STUDY_MARKER, fresh_output
from hpd_megatron.tracking import TrackingConfig, start_tracking
from hpd_megatron.tracking.redact import redact, redacted_config
from hpd_megatron.training.config import load_run_config
from tests.tool_runs import load_tool, run_main

ROOT = Path(__file__).resolve().parent.parent
STUDENT_YAML = ROOT / "recipes/models/tiny_student.yaml"
TINY_HF = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=32,
    max_position_embeddings=64,
    torch_dtype="float32",
)


def _tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


@contextmanager
def unchanged(directory: Path) -> Iterator[None]:
    """The body may fail, but must leave ``directory`` exactly as it was."""
    before = _tree(directory)
    yield
    assert _tree(directory) == before


def _config_error(directory: Path, load, *args) -> str:
    with unchanged(directory), pytest.raises(ConfigError) as error:
        load(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


# ---- recipes ------------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"student:\n  model: {STUDENT_YAML}\nloss:\n  method: sft\n" + text)
    return path


@pytest.mark.parametrize(
    "override,message",
    [
        ("logging.log_interval=0", "logging.log_interval: must be >= 1, got 0"),
        (
            "optimizer.max_consecutive_nonfinite=0",
            "optimizer.max_consecutive_nonfinite: must be >= 1, got 0",
        ),
        ("loss.chunk_size=0", "loss.chunk_size: must be >= 1, got 0"),
        ("optimizer.lr=-0.001", "optimizer.lr: must be >= 0, got -0.001"),
        (
            "checkpoint.stop_signals=[SIGTERM, SIGKILL]",
            "checkpoint.stop_signals: SIGKILL cannot be caught (use SIGTERM or SIGUSR1)",
        ),
        ("checkpoint.stop_signals=[SIGFOO]", "checkpoint.stop_signals: unknown signal 'SIGFOO'"),
    ],
)
def test_values_that_would_fail_late_are_refused_at_load(tmp_path, override, message):
    recipe = _recipe(tmp_path)
    assert _config_error(tmp_path, load_run_config, recipe, [override]) == f"{recipe}: {message}"


def test_duplicate_yaml_key_names_file_line_and_key(tmp_path):
    recipe = _recipe(
        tmp_path, "schedule:\n  train_steps: 10\n  warmup_steps: 1\n  train_steps: 5\n"
    )
    assert _config_error(tmp_path, load_run_config, recipe) == (
        f"{recipe}:8: not valid YAML (duplicate key 'train_steps')"
    )


def test_a_variable_with_a_numeric_default_fills_a_numeric_key(tmp_path, monkeypatch):
    monkeypatch.delenv("HPD_TEST_STEPS", raising=False)
    recipe = _recipe(tmp_path, "schedule:\n  train_steps: ${HPD_TEST_STEPS:-100}\n")
    assert load_run_config(recipe).schedule.train_steps == 100
    monkeypatch.setenv("HPD_TEST_STEPS", "7")
    assert load_run_config(recipe, ["schedule.warmup_steps=2"]).schedule.train_steps == 7


def test_non_utf8_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"run_dir: caf\xe9\n")
    assert _config_error(tmp_path, load_yaml, recipe) == (
        f"{recipe}: not UTF-8 text (invalid continuation byte at byte 12)"
    )


def test_directory_as_recipe(tmp_path):
    (tmp_path / "recipe.yaml").mkdir()
    assert _config_error(tmp_path, load_run_config, tmp_path / "recipe.yaml") == (
        f"{tmp_path / 'recipe.yaml'}: is a directory, not a YAML file"
    )


@pytest.mark.parametrize(
    "vocab,message",
    [
        ("32000.5", "model.vocab_size: expected an integer, got 32000.5"),
        ("many", "model.vocab_size: expected an integer, got 'many'"),
        ("0", "model.vocab_size: must be positive, got 0"),
    ],
)
def test_non_integer_vocab_size_in_a_model_description(tmp_path, vocab, message):
    description = yaml.safe_load((ROOT / "recipes/models/tiny_student.yaml").read_text())
    path = tmp_path / "model.yaml"
    path.write_text(
        yaml.safe_dump(description).replace(
            f"vocab_size: {description['vocab_size']}", f"vocab_size: {vocab}"
        )
    )
    assert _config_error(tmp_path, ModelDescription.from_yaml, path) == f"{path}: {message}"


def test_zero_heads_is_a_key_error_not_a_division_by_zero(tmp_path):
    description = yaml.safe_load((ROOT / "recipes/models/tiny_student.yaml").read_text())
    description.update(num_attention_heads=0, kv_channels=None)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(description))
    assert _config_error(tmp_path, ModelDescription.from_yaml, path) == (
        f"{path}: model.num_attention_heads: must be positive, got 0"
    )


# ---- the HF converter -------------------------------------------------------------------


def _hf_model(directory: Path, config: dict | None = None, vocab_size: int = 32) -> Path:
    """A tiny Llama in safetensors, shaped as the converter's own mapping expects for a
    ``vocab_size``-token vocabulary (``config`` may then break config.json)."""
    from safetensors.torch import save_file

    from hpd_megatron.convert import hf_config, mapping

    shaped = dict(TINY_HF, vocab_size=vocab_size)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(dict(shaped, **(config or {}))))
    description = hf_config.description_from_hf(shaped)
    shapes = mapping.hf_shapes(description, vocab_size)
    save_file({n: torch.ones(s) for n, s in shapes.items()}, str(directory / "model.safetensors"))
    return directory


def _convert_fails(tmp_path: Path, source: Path) -> str:
    out = tmp_path / "out"
    with unchanged(tmp_path):
        code, err = run_main(
            load_tool("convert_hf_to_megatron").main,
            ["--hf-dir", str(source), "--out", str(out), "--no-progress"],
        )
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


def test_hf_config_with_a_fractional_vocab_size(tmp_path):
    source = _hf_model(tmp_path / "hf", {"vocab_size": 32.5})
    assert _convert_fails(tmp_path, source) == (
        f"{source / 'config.json'}: vocab_size must be an integer, got 32.5"
    )


def test_truncated_safetensors(tmp_path):
    source = _hf_model(tmp_path / "hf")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert _convert_fails(tmp_path, source) == (
        f"{weights}: not a readable safetensors file (Error while deserializing header: "
        "incomplete metadata, file not fully covered)"
    )


def test_disk_full_while_converting(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Megatron's (forked) file writer calls this for every tensor it writes.
    monkeypatch.setattr(filesystem_async, "_write_item", no_space)
    source = _hf_model(tmp_path / "hf")
    assert _convert_fails(tmp_path, source) == (
        f"{tmp_path / 'out.partial'}: no space left on the device while writing the converted "
        "checkpoint; nothing was published"
    )


def test_index_entry_outside_the_model_directory(tmp_path):
    source = _hf_model(tmp_path / "hf")
    outside = tmp_path / "elsewhere.safetensors"
    (source / "model.safetensors").rename(outside)
    from safetensors import safe_open

    with safe_open(outside, framework="pt") as handle:
        names = list(handle.keys())
    index = {"weight_map": {name: "../elsewhere.safetensors" for name in names}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _convert_fails(tmp_path, source) == (
        f"{source / '../elsewhere.safetensors'}: points outside the model directory {source}"
    )


def test_side_file_symlinked_outside_the_model_directory(tmp_path):
    source = _hf_model(tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (source / "tokenizer_config.json").symlink_to(secret)
    assert _convert_fails(tmp_path, source) == (
        f"{source / 'tokenizer_config.json'}: points outside the model directory {source}"
    )


# ---- one tokenizer for teacher, student and data ----------------------------------------


def _word_tokenizer(directory: Path, size: int) -> Path:
    """A Hugging Face tokenizer of ``size`` made-up words: same size, other pieces."""
    from tokenizers import Tokenizer, models

    vocab = {f"word{i}": i for i in range(size)}
    Tokenizer(models.WordLevel(vocab, unk_token="word0")).save(str(directory / "tokenizer.json"))
    return directory


def _converted_description(tmp_path: Path, name: str, tokenizer_file: Path | None) -> Path:
    """model.yaml as tools/convert_hf_to_megatron.py writes it, for an HF directory holding
    ``tokenizer_file`` (the data's SentencePiece model) or else a word-level tokenizer."""
    from hpd_megatron.convert.hf_to_megatron import open_hf_checkpoint, write_side_files

    source = _hf_model(tmp_path / name, vocab_size=128)
    if tokenizer_file is None:
        _word_tokenizer(source, 128)
    else:
        (source / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    out = tmp_path / f"{name}_megatron"
    out.mkdir()
    write_side_files(open_hf_checkpoint(source), out)
    return out / "model.yaml"


def _fingerprint(model_yaml: Path) -> str:
    return ModelDescription.from_yaml(model_yaml).extra["tokenizer_fingerprint"]


def test_a_student_converted_with_another_tokenizer_of_the_same_size(tmp_path, prepared_data):
    """Llama-2 and Mistral both have 32000 tokens: the sizes agree, the fingerprints do not."""
    from hpd_megatron.training.inputs import check_inputs

    data_tokenizer = Path(prepared_data).parent / "tokenizer.model"
    other = _converted_description(tmp_path, "other", None)
    same = _converted_description(tmp_path, "same", data_tokenizer)
    assert _fingerprint(same) == load_tokenizer(data_tokenizer).fingerprint() != _fingerprint(other)
    recipe = _recipe(tmp_path, f"data:\n  train: {prepared_data}\n")
    check_inputs(load_run_config(recipe, [f"student.model={same}"]))
    run = load_run_config(recipe, [f"student.model={other}"])
    message = _config_error(tmp_path, check_inputs, run)
    assert message == (
        f"student.model ({other}) has tokenizer fingerprint {_fingerprint(other)} but "
        f"data.train ({prepared_data}.json) has {_fingerprint(same)} (same size, different "
        "pieces): teacher, student and data must share one tokenizer"
    )


def test_evaluating_with_another_tokenizer_than_the_model_was_converted_with(
    tmp_path, prepared_data
):
    from hpd_megatron.errors import DataError
    from hpd_megatron.eval.runner import GenerationJob, encode_job_prompts
    from hpd_megatron.eval.source import inspect_checkpoint

    model = _converted_description(tmp_path, "other", None)
    data_tokenizer = Path(prepared_data).parent / "tokenizer.model"
    job = GenerationJob(ckpt=str(model.parent), data="unused", tokenizer=str(data_tokenizer))
    info = inspect_checkpoint(job.ckpt, tokenizer=job.tokenizer)
    with unchanged(tmp_path), pytest.raises(DataError) as error:
        encode_job_prompts(job, info)
    assert str(error.value) == (
        f"tokenizer {data_tokenizer} has tokenizer fingerprint "
        f"{load_tokenizer(data_tokenizer).fingerprint()} but the model of {model.parent} has "
        f"{_fingerprint(model)} (same size, different pieces): pass the tokenizer the model "
        "was converted with"
    )


def test_teacher_and_student_of_different_vocabulary_sizes(tmp_path, prepared_data):
    from hpd_megatron.training.inputs import tokenizer_problems

    recipe = _recipe(tmp_path, f"data:\n  train: {prepared_data}\n")
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(
        yaml.safe_dump(dict(yaml.safe_load(STUDENT_YAML.read_text()), vocab_size=256))
    )
    run = load_run_config(recipe, ["loss.method=fkl", f"teacher.model={teacher}"])
    with unchanged(tmp_path):
        problems = tokenizer_problems(run)
    assert problems == [
        f"student.model ({STUDENT_YAML}) has a 128-token vocabulary but teacher.model "
        f"({teacher}) has 256: teacher, student and data must share one tokenizer",
        f"teacher.model ({teacher}) has a 256-token vocabulary but data.train "
        f"({prepared_data}.json) has 128: teacher, student and data must share one tokenizer",
    ]


# ---- the study's --out ------------------------------------------------------------------


def test_study_refuses_to_replace_a_directory_it_did_not_create(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _config_error(tmp_path, fresh_output, out) == (
        f"--out {out}: exists and is not a previous study's output (no {STUDY_MARKER}); "
        "remove it or choose another --out"
    )
    # Its own earlier output is replaced.
    fresh_output(tmp_path / "study")
    (tmp_path / "study" / "data" / "old.txt").write_text("old")
    fresh_output(tmp_path / "study")
    assert _tree(tmp_path / "study") == {
        STUDY_MARKER: b"written by python -m hpd_megatron.study\n",
        "data": None,
    }


# ---- Slurm --------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["SLURM_RESTART_COUNT", "HPD_MAX_REQUEUES"])
def test_slurm_counts_are_not_evaluated_as_bash(tmp_path, variable):
    marker = tmp_path / "ran"
    payload = f"a[$(touch {marker})]"
    # srun and scontrol stand-ins: the trainer "stops" (75), so the requeue test runs.
    script = (
        f"source {ROOT}/slurm/common.sh; srun() {{ return 75; }}; scontrol() {{ echo n1; }}; "
        "hpd_environment; hpd_train recipe.yaml"
    )
    env = {
        "PATH": os.environ["PATH"],
        "HPD_HOME": str(tmp_path),
        "SLURM_JOB_ID": "7",
        variable: payload,
    }
    with unchanged(tmp_path):
        result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.split("] ", 1)[1] == (
        f"error: {variable} must be a non-negative integer, got '{payload}'\n"
    )
    assert not marker.exists()


# ---- credentials --------------------------------------------------------------------------


def test_uri_credentials_and_expanded_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HPD_TEST_API_TOKEN", "tok-5ecret")
    recipe = _recipe(
        tmp_path,
        "tracking:\n  tracking_uri: https://alice:pa55@mlflow.example:5000\n"
        "  run_name: run-${HPD_TEST_API_TOKEN}\n",
    )
    run = load_run_config(recipe)
    assert run.tracking.tracking_uri == "https://alice:pa55@mlflow.example:5000"  # still usable
    saved = yaml.safe_dump(redacted_config(run))
    assert "pa55" not in saved and "alice" not in saved and "tok-5ecret" not in saved
    assert redacted_config(run)["tracking"]["tracking_uri"] == "https://***@mlflow.example:5000"
    assert redacted_config(run)["tracking"]["run_name"] == "run-***"
    assert redact("sqlite:////tmp/a.db http://h/x@y") == "sqlite:////tmp/a.db http://h/x@y"


def test_tracker_masks_credentials_in_params_warnings_and_the_script(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\nexport MLFLOW_TRACKING_PASSWORD=hunter2\nexport HPD_MAX_REQUEUES=3\n"
        "srun python -m x --uri https://bob:hunter3@host\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {"tracking": {"tracking_uri": "https://bob:hunter3@host"}}
    tracker = start_tracking(TrackingConfig(tracking_uri=uri), tmp_path, params)
    tracker.log_artifact(script, "slurm", redact_text=True)
    tracker.finish("FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["tracking.tracking_uri"] == "https://***@host"
    copy = Path(client.download_artifacts(tracker.run_id, "slurm/job.sbatch", str(tmp_path / "d")))
    assert copy.read_text() == (
        "#!/bin/bash\nexport MLFLOW_TRACKING_PASSWORD=***\nexport HPD_MAX_REQUEUES=3\n"
        "srun python -m x --uri https://***@host\n"
    )
    assert "hunter2" in script.read_text()  # the original is left alone
    # A warning that names an unreachable server with credentials in its URI.
    capsys.readouterr()
    config = TrackingConfig(
        tracking_uri="http://bob:hunter3@127.0.0.1:9", flush_timeout_s=0.5, retry_initial_s=0.1
    )
    start_tracking(config, tmp_path / "other", {}).finish("FINISHED")
    err = capsys.readouterr().err
    assert "hunter3" not in err and "http://***@127.0.0.1:9" in err


# ---- data -------------------------------------------------------------------------------


def test_non_utf8_jsonl_names_the_line(tmp_path):
    from hpd_megatron.data.records import read_records
    from hpd_megatron.errors import DataError

    path = tmp_path / "train.jsonl"
    record = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    ).encode()
    path.write_bytes(record + b"\n" + record.replace(b"hi", b"h\xff") + b"\n")
    with unchanged(tmp_path), pytest.raises(DataError) as error:
        list(read_records(path))
    assert str(error.value) == f"{path}:2: not UTF-8 text (invalid start byte at byte 44)"


@pytest.mark.parametrize("victim", ["input", "tokenizer"])
def test_prepare_data_refuses_to_overwrite_its_own_input(tmp_path, prepared_data, victim):
    """``--output-prefix data/train`` writes data/train.json: the input, or a tokenizer
    directory's tokenizer.json, must not be that file."""
    source = Path(prepared_data).parent
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    _word_tokenizer(tokenizer_dir, 128)
    records = tmp_path / "train.json"
    records.write_bytes((source / "train.jsonl").read_bytes())
    prefix = {"input": tmp_path / "train", "tokenizer": tokenizer_dir / "tokenizer"}[victim]
    args = ["--input", str(records), "--tokenizer", str(tokenizer_dir)]
    with unchanged(tmp_path):
        code, err = run_main(
            load_tool("prepare_data").main,
            [*args, "--output-prefix", str(prefix), "--seq-length", "64"],
        )
    option = {"input": "--input", "tokenizer": "--tokenizer"}[victim]
    assert code == 1 and "Traceback" not in err, err
    assert err.strip() == (
        f"error: --output-prefix: {prefix}.json is the {option} file; writing it would "
        "destroy the input (choose another output)"
    )
