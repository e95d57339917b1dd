"""The shared entry-point wrapper: one line per bad input, once per job, right exit codes."""

from __future__ import annotations

import subprocess
import sys
import typing
import uuid

import pytest

from hpd_megatron.cli import BAD_INPUT_EXIT_CODE, first_to_report, run_cli
from hpd_megatron.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    HpdError,
    NonFiniteTraining,
)


@pytest.mark.parametrize(
    "error", [ConfigError, DataError, CheckpointError, ConversionError, NonFiniteTraining]
)
def test_every_project_error_is_one_line_and_exit_1(error, capsys):
    def main():
        raise error("recipe.yaml: loss.method: bad")

    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    assert stopped.value.code == BAD_INPUT_EXIT_CODE
    assert capsys.readouterr().err == "error: recipe.yaml: loss.method: bad\n"


def test_other_exceptions_keep_their_traceback():
    def main():
        raise ValueError("a bug, not bad input")

    assert not issubclass(ValueError, HpdError)
    with pytest.raises(ValueError, match="a bug"):
        run_cli(main)


def test_exit_code_and_stop_request(capsys):
    from hpd_megatron.checkpoint.signals import STOP_EXIT_CODE, StopRequested

    with pytest.raises(SystemExit) as done:
        run_cli(lambda: 3)
    assert done.value.code == 3

    def stopped():
        raise StopRequested(7)

    with pytest.raises(SystemExit) as requeue:
        run_cli(stopped)
    assert requeue.value.code == STOP_EXIT_CODE == 75
    assert "after step 7" in capsys.readouterr().out


def test_one_report_per_job_and_message(monkeypatch):
    job = uuid.uuid4().hex
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    assert first_to_report("error: x") is True
    assert [first_to_report("error: x") for _ in range(3)] == [False, False, False]
    assert first_to_report("error: y") is True, "another message is reported too"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job + "-next")
    assert first_to_report("error: x") is True, "another job reports its own"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert first_to_report("error: x") is first_to_report("error: x") is True


@pytest.mark.multirank
def test_torchrun_prints_a_bad_recipe_once(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student: {model: {family: llama}}\nloss: {method: kl}\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
        + ["-m", "hpd_megatron.train", "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: {recipe}: loss.method: expected one of hpd, fkl, rkl, skl, srkl, tvd, jsd, "
        "sft, opd, got 'kl'"
    ]


def test_the_method_table_covers_every_method():
    from hpd_megatron.losses.methods import METHODS, MethodName, needs_teacher

    assert set(typing.get_args(MethodName)) == set(METHODS)
    assert {m for m in METHODS if not needs_teacher(m)} == {"sft"}
