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
from hpd_megatron.eval.benchmarks import (
    average_row,
    format_table,
    load_benchmarks,
    protocol_k,
)
from hpd_megatron.eval.generate import Generation
from hpd_megatron.eval.prompts import EvalRecord
from hpd_megatron.eval.runner import Reply
from hpd_megatron.eval.source import inspect_checkpoint
from hpd_megatron.eval.teacher_data import training_records
from hpd_megatron.eval.tracking import tracking_target
from hpd_megatron.evaluate import main
from tests.test_generation import TEST_PROBLEMS, write_eval_task
from tests.tool_runs import load_tool, run_main


def write_verl(path: Path, rows: list[dict]) -> Path:
    """A parquet file in the verl format (what the reference's evaluation/data/ holds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # No rows: the verl columns all the same (an empty benchmark, not a malformed file).
    table = pa.Table.from_pylist(rows or [verl_row("x", "1")])
    pq.write_table(table if rows else table.slice(0, 0), path)
    return path


def verl_row(question: str, answer: str, source: str | None = "math500") -> dict:
    row = {
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"ground_truth": answer, "style": "rule"},
    }
    return row if source is None else {"data_source": source, **row}


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
    assert "--temperature 0 is greedy" in _fail(
        ["--ckpt", ckpt, "--data", data, "--temperature", "0", "--samples", "4"]
    )
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


def test_verl_parquet_benchmarks_and_their_problems(tmp_path):
    """Names from data_source or the file, the paper's k, and every kind of bad input said
    in one line naming the file and row, counted, the rest read."""
    good = write_verl(
        tmp_path / "mixed.parquet",
        [
            verl_row("Compute 1 + 1.", "2", "aime24"),
            verl_row("What is half?", "\\frac{1}{2}", "aime24"),
            verl_row("Name her.", "@@", "MATH500"),  # math-verify cannot parse it
            {
                "data_source": "aime24",
                "prompt": [{"role": "user", "content": "q"}],
                "reward_model": {"style": "rule"},
            },
            verl_row("Compute 2 + 2.", "4", "MATH500"),
        ],
    )
    unnamed = write_verl(tmp_path / "minerva.parquet", [verl_row("Compute 3 + 3.", "6", None)])
    columns = write_verl(tmp_path / "columns.parquet", [{"question": "q", "answer": "1"}])
    empty = write_verl(tmp_path / "empty.parquet", [])
    jsonl = tmp_path / "arith.jsonl"
    jsonl.write_text('{"prompt": "Compute 1 + 2.", "answer": 3}\n')
    said = []
    found = load_benchmarks(
        [str(p) for p in (good, unnamed, columns, empty, jsonl)], None, False, None, said.append
    )
    assert [(b.name, b.k, len(b.records)) for b in found.benchmarks] == [
        ("aime24", 32, 2),
        ("MATH500", 8, 2),
        ("minerva", 8, 1),
        ("arith", 32, 1),  # not the paper's: under 100 problems, k = 32
    ]
    assert found.problems == {
        "bad_files": 1,
        "bad_rows": 1,
        "empty_benchmarks": 1,
        "unparsed_references": 1,
    }
    assert said == [
        f"{good}: row 3: no reward_model.ground_truth; left out",
        f"{good}: row 2: math-verify cannot parse the ground truth '@@'; compared by hand "
        "(eval/answers.py)",
        f"{columns}: no column prompt, reward_model (verl format: prompt, "
        "reward_model.ground_truth, data_source; found question, answer); left out",
        f"{empty}: benchmark empty has no problems; left out",
    ]
    record = found.benchmarks[0].records[1]
    assert (record.line, record.reference, record.samples, record.path) == (
        1,
        "\\frac{1}{2}",
        32,
        str(good),
    )
    assert record.messages == [{"role": "user", "content": "What is half?"}]
    # --samples and greedy override the paper's k; --limit applies per benchmark.
    again = load_benchmarks([str(good)], 4, False, 1, said.append)
    assert [(b.name, b.k, len(b.records)) for b in again.benchmarks] == [
        ("aime24", 4, 1),
        ("MATH500", 4, 1),
    ]
    assert [
        b.k for b in load_benchmarks([str(good)], None, True, None, said.append).benchmarks
    ] == [
        1,
        1,
    ]


def test_benchmark_input_that_stops_the_run(tmp_path):
    columns = write_verl(tmp_path / "columns.parquet", [{"question": "q"}])
    with pytest.raises(Exception, match="no benchmark left to evaluate"):
        load_benchmarks([str(columns)], None, False, None, lambda _: None)
    with pytest.raises(Exception, match="no such evaluation file"):
        load_benchmarks([str(tmp_path / "gone.parquet")], None, False, None, lambda _: None)
    a = write_verl(tmp_path / "a.parquet", [verl_row("q", "1", "amc")])
    b = write_verl(tmp_path / "b.parquet", [verl_row("q", "1", "amc")])
    with pytest.raises(Exception, match=f"benchmark amc comes from both {a} and {b}"):
        load_benchmarks([str(a), str(b)], None, False, None, lambda _: None)


@pytest.mark.parametrize(
    "name,problems,k",
    [
        ("aime24", 30, 32),
        ("AIME 2025", 30, 32),
        ("amc23", 83, 32),
        ("math500", 500, 8),
        ("MATH-500", 500, 8),
        ("minerva_math", 272, 8),
        ("olympiadbench", 675, 8),
        ("gsm8k", 1319, 8),
        ("tiny", 40, 32),
    ],
)
def test_protocol_k(name, problems, k):
    assert protocol_k(name, problems) == k


def test_average_row_and_table_by_hand():
    rows = [
        {
            "k": 32,
            "problems": 30,
            "avg@k": 0.2,
            "stderr": 0.03,
            "mean_response_tokens": 100.0,
            "truncation_rate": 0.1,
            "token_entropy": 0.5,
            "no_answer_share": 0.0,
        },
        {
            "k": 8,
            "problems": 500,
            "avg@k": 0.6,
            "stderr": 0.04,
            "mean_response_tokens": 50.0,
            "truncation_rate": 0.0,
            "token_entropy": 0.3,
            "no_answer_share": 0.2,
        },
    ]
    average = average_row(rows)
    assert average["avg@k"] == pytest.approx(0.4)  # each benchmark weighs the same
    assert average["stderr"] == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
    assert average["mean_response_tokens"] == pytest.approx(75.0)
    assert average["problems"] == 530
    assert average_row([rows[0], dict(rows[1], stderr=None)])["stderr"] is None
    text = format_table({"aime24": rows[0], "math500": rows[1], "average": average})
    assert text.splitlines()[1].split() == [
        "aime24",
        "32",
        "30",
        "0.2000",
        "0.0300",
        "100.0",
        "0.100",
        "0.500",
    ]
    assert text.splitlines()[3].split()[:4] == ["average", "530", "0.4000", "0.0250"]


def test_tracked_metrics():
    """The table's MLflow names (the run itself: tests/test_benchmarks.py)."""
    from hpd_megatron.evaluate import tracked_metrics

    table = {
        "aime24": {
            "k": 32,
            "problems": 2,
            "skipped_overlong": 0,
            "avg@k": 0.25,
            "stderr": 0.1,
            "mean_response_tokens": 9.0,
            "truncation_rate": 0.5,
            "token_entropy": 1.5,
            "no_answer_share": 0.0,
        },
        "tiny": {
            "k": 1,
            "problems": 1,
            "skipped_overlong": 0,
            "avg@k": 1.0,
            "stderr": None,
            "mean_response_tokens": 3.0,
            "truncation_rate": 0.0,
            "token_entropy": 0.5,
            "no_answer_share": 0.0,
        },
    }
    assert sorted(tracked_metrics(table)) == sorted(
        [
            f"eval/aime24/{key}"
            for key in (
                "avg_at_32",
                "stderr",
                "problems",
                "mean_response_tokens",
                "truncation_rate",
                "token_entropy",
                "no_answer_share",
            )
        ]
        + [
            f"eval/tiny/{key}"
            for key in (
                "avg_at_1",
                "problems",
                "mean_response_tokens",
                "truncation_rate",
                "token_entropy",
                "no_answer_share",
            )
        ]
    )
