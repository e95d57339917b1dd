"""Benchmark files and the paper's evaluation protocol: inputs, k per benchmark, the table.

Inputs: the verl parquet format of the reference's ``evaluation/data/`` (AIME24, AIME25, AMC,
MATH500, Minerva, OlympiadBench), one row per problem:

    prompt        list of chat messages [{"role": "user", "content": "..."}]
    reward_model  {"ground_truth": "\\\\frac{1}{2}", ...}
    data_source   the benchmark's name (optional; else the file's name)

or the evaluation JSONL of ``eval/prompts.py`` (one benchmark named after the file).

Protocol (the HPD paper's): avg@32 on AIME24/25 and AMC, avg@8 on MATH500 and Minerva, at
temperature 0.7 and top-p 0.95. The paper's rule behind those k is the set's size: 30 to 83
problems get 32 samples, 272 to 500 get 8, so every benchmark has about a thousand or more
replies behind its average. OlympiadBench (675 problems) and any other benchmark follow the
same rule: 32 below ``SMALL_SET`` problems, else 8.

Bad input does not stop the run: a parquet file without the columns above, a row that is
not a problem, an empty benchmark, or a ground truth math-verify cannot parse is one line
naming the file (and row), counted in ``Benchmarks.problems``; the others go on. (A missing
file is an error before anything runs: it is a typo, not a data problem.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpd_megatron.errors import ConfigError, DataError
from hpd_megatron.eval.answers import avg_at_k, reference_parses, sample_stderr
from hpd_megatron.eval.prompts import EvalRecord, eval_record, read_eval_records

TEMPERATURE = 0.7
TOP_P = 0.95
MAX_NEW_TOKENS = 8192
"""The issue leaves the reply budget open; 8192 tokens is the common budget for 1.5B-7B math
students in the distillation literature. Replies also stop where the context ends; the
truncation rate in the table shows how many hit either limit."""
SMALL_SET = 100
PAPER_K = (("aime", 32), ("amc", 32), ("math500", 8), ("minerva", 8))
"""k of the paper's benchmarks, by the start of the normalised name (aime24, AIME 2025, amc23)."""
REQUIRED_COLUMNS = ("prompt", "reward_model")


@dataclass
class Benchmark:
    name: str
    path: str
    records: list[EvalRecord]
    k: int


@dataclass
class Benchmarks:
    benchmarks: list[Benchmark]
    problems: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("bad_files", "bad_rows", "empty_benchmarks", "unparsed_references"), 0
        )
    )
    """What was left out (or, for unparsed references, compared by hand), by kind."""

    @property
    def records(self) -> list[EvalRecord]:
        return [record for benchmark in self.benchmarks for record in benchmark.records]


def protocol_k(name: str, problems: int) -> int:
    """The paper's k for a benchmark of this name and size (module doc)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for prefix, k in PAPER_K:
        if key.startswith(prefix):
            return k
    return 32 if problems < SMALL_SET else 8


def load_benchmarks(
    paths: Sequence[str],
    samples: int | None,
    greedy: bool,
    limit: int | None,
    say: Callable[[str], object],
) -> Benchmarks:
    """Every benchmark of ``paths``, its first ``limit`` records, each record's k set:
    ``samples``, else 1 when greedy, else ``protocol_k``. Problems are said and counted."""
    found = Benchmarks([])
    for path in paths:
        for name, records in _read_file(path, found.problems, say).items():
            records = records[:limit]
            if not records:
                found.problems["empty_benchmarks"] += 1
                say(f"{path}: benchmark {name} has no problems; left out")
                continue
            clash = next((b for b in found.benchmarks if b.name == name), None)
            if clash is not None:
                raise ConfigError(
                    f"--data: benchmark {name} comes from both {clash.path} and {path}; "
                    "give each benchmark one file"
                )
            k = samples or (1 if greedy else protocol_k(name, len(records)))
            for record in records:
                record.benchmark, record.samples = name, k
            found.benchmarks.append(Benchmark(name, str(path), records, k))
    if not found.benchmarks:
        raise DataError(f"--data: no benchmark left to evaluate in {' '.join(map(str, paths))}")
    return found


def _read_file(
    path: str, problems: dict[str, int], say: Callable[[str], object]
) -> dict[str, list[EvalRecord]]:
    """Benchmark name -> records of one file; unparsed references are said and counted."""
    if Path(path).suffix == ".parquet":
        by_name = read_parquet(path, problems, say)
    else:
        by_name = {Path(path).stem: read_eval_records(path, allow_empty=True)}
    for records in by_name.values():
        for record in records:
            if not reference_parses(record.reference or ""):
                problems["unparsed_references"] += 1
                say(
                    f"{_where(record)}: math-verify cannot parse the ground truth "
                    f"{record.reference!r}; compared by hand (eval/answers.py)"
                )
    return by_name


def read_parquet(
    path: str, problems: dict[str, int], say: Callable[[str], object]
) -> dict[str, list[EvalRecord]]:
    """Benchmark name (``data_source``, else the file's stem) -> the records of a verl
    parquet file; a bad file or row is said, counted and left out."""
    import pyarrow as pa  # noqa: PLC0415 - a dependency of mlflow, needed only here
    import pyarrow.parquet as pq  # noqa: PLC0415

    if not Path(path).is_file():
        raise DataError(f"{path}: no such evaluation file")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        problems["bad_files"] += 1
        say(f"{path}: not a readable parquet file ({error}); left out")
        return {}
    missing = [column for column in REQUIRED_COLUMNS if column not in table.column_names]
    if missing:
        problems["bad_files"] += 1
        say(
            f"{path}: no column {', '.join(missing)} (verl format: prompt, "
            f"reward_model.ground_truth, data_source; found {', '.join(table.column_names)}); "
            "left out"
        )
        return {}
    by_name: dict[str, list[EvalRecord]] = {Path(path).stem: []} if not table.num_rows else {}
    for row, raw in enumerate(table.to_pylist()):
        try:
            record = _parquet_record(raw, row)
        except DataError as error:
            problems["bad_rows"] += 1
            say(f"{path}: row {row}: {error}; left out")
            continue
        record.path = str(path)
        by_name.setdefault(raw.get("data_source") or Path(path).stem, []).append(record)
    return by_name


def _parquet_record(raw: dict[str, Any], row: int) -> EvalRecord:
    reward = raw["reward_model"]
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise DataError("no reward_model.ground_truth")
    prompt = raw["prompt"]
    key = "prompt" if isinstance(prompt, str) else "messages"
    return eval_record({key: prompt, "answer": reward["ground_truth"]}, row)


def _where(record: EvalRecord) -> str:
    kind = "row" if record.path.endswith(".parquet") else "line"
    return f"{record.path}: {kind} {record.line}"


# --- the table ------------------------------------------------------------------------------

COLUMNS = (
    ("avg@k", "avg@k", "{:.4f}"),
    ("stderr", "stderr", "{:.4f}"),
    ("mean_response_tokens", "reply tokens", "{:.1f}"),
    ("truncation_rate", "truncated", "{:.3f}"),
    ("token_entropy", "entropy", "{:.3f}"),
)


def benchmark_table(rows: list[dict[str, Any]], found: Benchmarks) -> dict[str, dict[str, Any]]:
    """One entry per benchmark with replies (and "average" over them when there are
    several): k, problems scored, avg@k, its standard error over the k samples, mean reply
    length, truncation rate, token entropy, share of replies without an answer."""
    table: dict[str, dict[str, Any]] = {}
    for benchmark in found.benchmarks:
        mine = [row for row in rows if row["benchmark"] == benchmark.name]
        if not mine:
            continue  # every prompt too long for the context: said by the runner
        by_prompt: dict[int, list[bool]] = {}
        for row in mine:
            by_prompt.setdefault(row["line"], []).append(row["correct"])
        tokens = sum(row["response_tokens"] for row in mine)
        correct = list(by_prompt.values())
        table[benchmark.name] = {
            "k": benchmark.k,
            "problems": len(by_prompt),
            "skipped_overlong": len(benchmark.records) - len(by_prompt),
            "avg@k": avg_at_k(correct),
            "stderr": sample_stderr(correct),
            "mean_response_tokens": tokens / len(mine),
            "truncation_rate": sum(row["finish"] != "eos" for row in mine) / len(mine),
            "token_entropy": sum(row["entropy"] * row["response_tokens"] for row in mine) / tokens,
            "no_answer_share": sum(row["extracted"] is None for row in mine) / len(mine),
        }
    if len(table) > 1:
        table["average"] = average_row(list(table.values()))
    return table


def average_row(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's "Avg." column: each benchmark weighs the same. The standard error treats
    the benchmarks as independent: sqrt(sum of squares) / count."""
    average = {
        key: sum(entry[key] for entry in entries) / len(entries)
        for key in (
            "avg@k",
            "mean_response_tokens",
            "truncation_rate",
            "token_entropy",
            "no_answer_share",
        )
    }
    errors = [entry["stderr"] for entry in entries]
    average["stderr"] = (
        None if None in errors else math.sqrt(sum(error**2 for error in errors)) / len(entries)
    )
    average["problems"] = sum(entry["problems"] for entry in entries)
    return average


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The table as aligned text, one line per benchmark."""
    width = max(len("benchmark"), *map(len, table))
    header = f"{'benchmark':<{width}} {'k':>3} {'problems':>8} " + " ".join(
        f"{title:>12}" for _, title, _ in COLUMNS
    )
    lines = [header]
    for name, entry in table.items():
        cells = [
            f"{'-' if entry.get(key) is None else spec.format(entry[key]):>12}"
            for key, _, spec in COLUMNS
        ]
        lines.append(
            f"{name:<{width}} {entry.get('k', ''):>3} {entry['problems']:>8} " + " ".join(cells)
        )
    return "\n".join(lines)
