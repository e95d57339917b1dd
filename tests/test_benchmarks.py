"""``hpd_megatron.evaluate`` on verl parquet benchmarks at TP1 and TP2 (2 gloo ranks).

A tiny untrained model is exported at TP1 with the arithmetic task's tokenizer beside it;
the command then evaluates two parquet benchmarks with chat prompts (aime24, k = 32, and
math500, k = 8, by the paper's protocol) plus a file without the verl columns and a ground
truth math-verify cannot parse, at TP1 x DP2 and at TP2. Both layouts must give the same
replies and verdicts, the table must follow from the replies, the bad input must be counted
and the run at TP1 must land in MLflow as a run nested under the given training run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hpd_megatron.eval.answers import avg_at_k, judge, sample_stderr
from tests.multiprocess import free_port, run_on_ranks
from tests.test_evaluate_cli import verl_row, write_verl
from tests.test_generation import MODEL, write_eval_task

NEW_TOKENS = 5


def _write_benchmarks(root: Path) -> list[str]:
    aime = write_verl(
        root / "aime.parquet",
        [verl_row("Compute 2 + 3.", "5", "aime24"), verl_row("Compute 7 * 8.", "56", "aime24")],
    )
    math500 = write_verl(
        root / "math.parquet",
        [
            verl_row("Compute 12 + 30.", "42", "math500"),
            verl_row("Compute 9 - 4.", "@@", "math500"),  # math-verify cannot parse it
            verl_row("Compute 6 + 6.", "\\frac{24}{2}", "math500"),
        ],
    )
    columns = write_verl(root / "columns.parquet", [{"question": "Compute 1 + 1.", "answer": "2"}])
    return [str(aime), str(math500), str(columns)]


def _export_and_evaluate(root: str, files: list[str], port: int) -> None:
    """Export a fresh model at TP1, then the command at TP1 x DP2 (tracked) and at TP2."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hpd_megatron.checkpoint.weights import export_model_weights
    from hpd_megatron.evaluate import main as evaluate
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    root_path = Path(root)
    description = ModelDescription.from_dict(MODEL)
    initialize_parallel(ParallelLayout(1, 1), seed=3, models=[("model", description)])
    model = build_gpt_model(description, transformer_config(description)).eval()
    export_model_weights(model, root_path / "export", description=description)
    if dist.get_rank() == 0:
        shutil.copy(root_path / "data" / "tokenizer.model", root_path / "export")
    parallel_state.destroy_model_parallel()

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    common = ["--ckpt", str(root_path / "export"), "--data", *files]
    common += ["--max-new-tokens", str(NEW_TOKENS), "--batch-size", "16", "--seed", "5"]
    tracking = ["--tracking-uri", f"sqlite:///{root_path / 'mlflow.db'}", "--run-id", "parent"]
    evaluate([*common, "--out", str(root_path / "tp1"), *tracking, "--experiment", "evals"])
    os.environ["MASTER_PORT"] = str(port)  # the last run tore the process group down
    evaluate([*common, "--tp", "2", "--out", str(root_path / "tp2")])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    root = write_eval_task(tmp_path_factory.mktemp("benchmarks"))
    files = _write_benchmarks(root)
    run_on_ranks(_export_and_evaluate, 2, str(root), files, free_port())
    return root


def _read(directory: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (directory / "generations.jsonl").read_text().splitlines()]
    return rows, json.loads((directory / "summary.json").read_text())


def test_tp1_and_tp2_give_the_same_replies_and_scores(evaluated):
    tp1, summary1 = _read(evaluated / "tp1")
    tp2, summary2 = _read(evaluated / "tp2")
    assert summary1["layout"].startswith("TP=1 PP=1 CP=1 DP=2")
    assert summary2["layout"].startswith("TP=2")
    assert len(tp1) == 2 * 32 + 3 * 8
    assert [r["response"] for r in tp1] == [r["response"] for r in tp2]
    assert len({r["response"] for r in tp1}) > 10, "sampled replies should differ"
    keys = ("benchmark", "line", "sample", "extracted", "correct", "stage")
    assert [[r[k] for k in keys] for r in tp1] == [[r[k] for k in keys] for r in tp2]
    for name, entry in summary1["benchmarks"].items():
        other = summary2["benchmarks"][name]
        assert entry["avg@k"] == other["avg@k"] and entry["stderr"] == other["stderr"]
        assert entry["token_entropy"] == pytest.approx(other["token_entropy"], abs=1e-5)


def test_the_protocol_and_the_table(evaluated):
    rows, summary = _read(evaluated / "tp1")
    assert summary["protocol"] == {
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": NEW_TOKENS,
        "samples": {"aime24": 32, "math500": 8},
    }
    assert summary["input_problems"] == {
        "bad_files": 1,
        "bad_rows": 0,
        "empty_benchmarks": 0,
        "unparsed_references": 1,
    }
    assert list(summary["benchmarks"]) == ["aime24", "math500", "average"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Compute 2 + 3."}]
    for name, k in (("aime24", 32), ("math500", 8)):
        mine = [row for row in rows if row["benchmark"] == name]
        entry = summary["benchmarks"][name]
        by_line: dict[int, list[bool]] = {}
        for row in mine:
            assert row["correct"] == judge(row["response"], row["reference"]).correct
            by_line.setdefault(row["line"], []).append(row["correct"])
        assert all(len(samples) == k for samples in by_line.values())
        assert entry["k"] == k and entry["problems"] == len(by_line)
        assert entry["avg@k"] == pytest.approx(avg_at_k(list(by_line.values())))
        assert entry["stderr"] == pytest.approx(sample_stderr(list(by_line.values())))
        assert entry["truncation_rate"] == pytest.approx(
            sum(row["finish"] != "eos" for row in mine) / len(mine)
        )
        assert entry["mean_response_tokens"] == pytest.approx(
            sum(row["response_tokens"] for row in mine) / len(mine)
        )
        assert 1 <= entry["mean_response_tokens"] <= NEW_TOKENS
    average = summary["benchmarks"]["average"]
    assert average["avg@k"] == pytest.approx(
        (summary["benchmarks"]["aime24"]["avg@k"] + summary["benchmarks"]["math500"]["avg@k"]) / 2
    )


def test_the_run_is_nested_in_mlflow(evaluated):
    from mlflow.tracking import MlflowClient

    _, summary = _read(evaluated / "tp1")
    client = MlflowClient(f"sqlite:///{evaluated / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    assert run.info.run_name == "eval-aime24+math500"
    assert run.data.tags["mlflow.parentRunId"] == "parent"
    assert run.data.params["k/aime24"] == "32" and run.data.params["k/math500"] == "8"
    assert run.data.params["temperature"] == "0.7" and run.data.params["top_p"] == "0.95"
    for name in ("aime24", "math500", "average"):
        entry = summary["benchmarks"][name]
        key = f"avg_at_{entry['k']}" if "k" in entry else "avg_at_k"
        assert run.data.metrics[f"eval/{name}/{key}"] == pytest.approx(entry["avg@k"])
        assert run.data.metrics[f"eval/{name}/stderr"] == pytest.approx(entry["stderr"])
        assert run.data.metrics[f"eval/{name}/truncation_rate"] == pytest.approx(
            entry["truncation_rate"]
        )
