"""``python -m hpd_megatron.evaluate``: bad input, where the tokenizer and tracking come from,
and the records ``tools/generate_data.py`` writes. (The commands' runs on 4 ranks are in
tests/test_generation.py, which shares one set of processes with the model tests.)

Bad input fails before any process group exists, with one line naming the file and line,
the path or the option.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hpd_megatron.data.records import read_records
from hpd_megatron.eval.generate import Generation
from hpd_megatron.eval.prompts import EvalRecord
from hpd_megatron.eval.runner import Reply
from hpd_megatron.eval.source import inspect_checkpoint
from hpd_megatron.eval.teacher_data import training_records
from hpd_megatron.eval.tracking import tracking_target
from hpd_megatron.evaluate import main
from tests.test_generation import TEST_PROBLEMS, write_eval_task
from tests.tool_runs import load_tool, run_main


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_eval_task(tmp_path_factory.mktemp("evaluate"))


def _fail_on_data(task: Path, data: Path) -> str:
    """The error for evaluating the task's model on ``data``."""
    tokenizer = task / "data" / "tokenizer.model"
    return _fail(
        ["--ckpt", str(task / "described"), "--data", str(data), "--tokenizer", str(tokenizer)]
    )


def _fail(argv: list[str]) -> str:
    """The one-line error ``main`` exits with (code 1)."""
    code, err = run_main(main, argv)
    message = err.strip()
    assert code == 1 and message.startswith("error: ") and "\n" not in message, err
    return message


def test_malformed_line_names_file_and_line(task):
    bad = task / "bad.jsonl"
    bad.write_text('{"prompt": "Compute 1 + 1.", "answer": 2}\n\n{"prompt": "Compute 2 + 2.", \n')
    message = _fail_on_data(task, bad)
    assert f"{bad}:3: not valid JSON" in message


@pytest.mark.parametrize(
    "record,expected",
    [
        ({"prompt": "Compute 1 + 1."}, "no reference answer"),
        ({"prompt": 7, "answer": 1}, '"prompt" must be a string'),
        (
            {"prompt": "a", "messages": [], "answer": 1},
            'expected exactly one of "prompt" or "messages"',
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "answer": True},
            '"answer" must be a string or a number',
        ),
        (
            {"messages": [{"role": "assistant", "content": "The answer is 1."}]},
            "must end with a user message",
        ),
    ],
)
def test_bad_record_names_file_and_line(task, record, expected):
    bad = task / "bad_record.jsonl"
    bad.write_text(
        json.dumps({"prompt": "Compute 1 + 1.", "answer": 2}) + "\n" + json.dumps(record) + "\n"
    )
    message = _fail_on_data(task, bad)
    assert message.startswith(f"error: {bad}:2: ") and expected in message


def test_missing_tokenizer_names_the_checkpoint(task):
    message = _fail(["--ckpt", str(task / "described"), "--data", str(task / "eval.jsonl")])
    assert f"{task / 'described'}: no tokenizer found" in message
    assert str(task / "described" / "hf") in message and "--tokenizer" in message


def test_missing_tokenizer_of_the_training_data_names_it(task):
    # An export of hpd_megatron.train: its run's config names the data, whose sidecar names
    # a tokenizer that has since been deleted.
    run = task / "run"
    (run / "export").mkdir(parents=True)
    shutil.copy(task / "described" / "model.yaml", run / "export")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run),
                "checkpoint": {"export_dir": str(run / "export")},
                "data": {"train": str(run / "train")},
            }
        )
    )
    gone = task / "gone" / "tokenizer.model"
    (run / "train.json").write_text(
        json.dumps({"tokenizer": {"path": str(gone)}, "chat_template": "builtin"})
    )
    message = _fail(["--ckpt", str(run / "export"), "--data", str(task / "eval.jsonl")])
    assert (
        f"{gone}: the tokenizer of {run / 'export'}'s training data (named in {run / 'train.json'})"
        in message
    )

    shutil.copy(task / "data" / "tokenizer.model", run / "tokenizer.model")
    (run / "train.json").write_text(
        json.dumps(
            {"tokenizer": {"path": str(run / "tokenizer.model")}, "chat_template": "builtin"}
        )
    )
    info = inspect_checkpoint(run / "export")
    assert (info.tokenizer, info.chat_template, info.step) == (
        run / "tokenizer.model",
        "builtin",
        None,
    )


def test_other_bad_input(task):
    ckpt, data = str(task / "described"), str(task / "eval.jsonl")
    tokenizer = str(task / "data" / "tokenizer.model")
    assert f"{task / 'nope.model'}: no such tokenizer file" in _fail(
        ["--ckpt", ckpt, "--data", data, "--tokenizer", str(task / "nope.model")]
    )
    assert f"{task / 'nope'}: no such checkpoint directory" in _fail(
        ["--ckpt", str(task / "nope"), "--data", data]
    )
    assert f"{task / 'nope.jsonl'}: no such evaluation file" in _fail(
        ["--ckpt", ckpt, "--data", str(task / "nope.jsonl"), "--tokenizer", tokenizer]
    )
    assert "--temperature 0 is greedy" in _fail(["--ckpt", ckpt, "--data", data, "--samples", "4"])
    assert "--top-p: must be in (0, 1]" in _fail(
        ["--ckpt", ckpt, "--data", data, "--temperature", "1", "--top-p", "0"]
    )
    # Every prompt longer than a 10-token context: reported, and nothing is left to run.
    message = _fail(
        ["--ckpt", ckpt, "--data", data, "--tokenizer", tokenizer, "--context-length", "10"]
    )
    assert f"{data}: skipped {TEST_PROBLEMS + 2} prompt(s) of 10 tokens or more" in message
    assert "nothing left to generate" in message


def test_unwritable_outputs_fail_before_generating(task):
    """Checked before the model is built: hours of generation are never lost to --out."""
    ckpt, data = str(task / "described"), str(task / "eval.jsonl")
    tokenizer = str(task / "data" / "tokenizer.model")
    args = ["--ckpt", ckpt, "--data", data, "--tokenizer", tokenizer]
    blocker = task / "a_file"
    blocker.write_text("not a directory")
    assert _fail([*args, "--out", str(blocker / "eval")]) == (
        f"error: --out: {blocker} is not a directory, so {blocker / 'eval'} cannot be made"
    )
    before = Path(data).read_bytes()
    code, err = run_main(load_tool("generate_data").main, [*args, "--out", data])
    assert code == 1 and err.strip() == (
        f"error: --out: {data} is the --data file; writing it would destroy the input "
        "(choose another output)"
    ), err
    assert Path(data).read_bytes() == before
    code, err = run_main(load_tool("generate_data").main, [*args, "--out", str(task)])
    assert code == 1 and err.strip() == (
        f"error: --out: {task} is a directory, not a file it can write"
    ), err


def test_tracking_target(task, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = inspect_checkpoint(task / "described", tokenizer="unused")
    assert tracking_target(info, None, None) is None  # no store named anywhere: no tracking
    assert tracking_target(info, "sqlite:///x.db", None).tracking_uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_target(info, None, "evals").tracking_uri == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # A checkpoint whose training run tracked: never its store (it could name any server).
    info.training = {"run_dir": str(task / "r"), "tracking": {"enabled": True, "experiment": "exp"}}
    assert tracking_target(info, None, None) is None
    assert tracking_target(info, "sqlite:///x.db", None).experiment == "exp"


def test_training_records_keep_finished_replies_in_the_prompt_schema(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 2 + 2."},
    ]
    replies = [
        Reply(
            EvalRecord(1, "Compute 1 + 1.", [], "2"),
            0,
            5,
            Generation([1, 2], [0.1, 0.2], "eos"),
            "The answer is 2.",
        ),
        Reply(
            EvalRecord(1, "Compute 1 + 1.", [], "2"),
            1,
            5,
            Generation([1, 2], [0.1, 0.2], "eos"),
            "The answer is 3.",
        ),
        Reply(EvalRecord(2, chat, chat, "4"), 0, 9, Generation([1], [0.1], "length"), "The answer"),
        Reply(EvalRecord(3, chat, chat, None), 0, 9, Generation([1], [0.1], "eos"), "4"),
    ]
    records, dropped = training_records(replies)
    assert dropped == {"unfinished": 1, "incorrect": 0} and len(records) == 3
    assert records[0] == {"prompt": "Compute 1 + 1.", "response": "The answer is 2.", "answer": "2"}
    assert records[2] == {"messages": [*chat, {"role": "assistant", "content": "4"}]}
    records, dropped = training_records(replies, only_correct=True, keep_unfinished=True)
    assert dropped == {"unfinished": 0, "incorrect": 3} and len(records) == 1
    # What prepare_data reads.
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in training_records(replies)[0]))
    assert [messages[-1]["content"] for _, messages in read_records(path)] == [
        "The answer is 2.",
        "The answer is 3.",
        "4",
    ]
