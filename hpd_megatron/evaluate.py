"""Evaluate a checkpoint on math benchmarks, by the paper's protocol: avg@k, length, entropy.

    torchrun --nproc-per-node N -m hpd_megatron.evaluate --ckpt DIR --data A.parquet B.jsonl \\
        [--tp T --pp P] [--samples k --temperature T --top-p P --max-new-tokens N] [--out DIR]

The benchmark files (verl parquet or JSONL, ``eval/benchmarks.py``) run together; each
benchmark gets its k (the paper's, unless --samples), temperature 0.7 and top-p 0.95 unless
overridden. Replies are scored by math-verify's cascade (``eval/answers.py``).

Writes ``OUT/generations.jsonl`` (one line per reply: the benchmark, the prompt, the reply,
the extracted and reference answers, correctness and the stage that decided, token count,
finish reason, mean entropy) and ``OUT/summary.json`` (the per-benchmark table, the average
over benchmarks, the protocol, the input problems, the pooled metrics of ``score``, the
settings), both staged and renamed at the end; OUT defaults to ``eval_<ckpt name>_<data
names>`` beside the checkpoint. The table is printed; with tracking (``eval/tracking.py``)
it also goes to MLflow as a child run of the checkpoint's training run.

Reply length counts generated tokens including the EOS that ends a reply; token entropy
is the mean, over those tokens, of the entropy (nats) of the distribution each was drawn
from (``softmax(logits / T)`` before top-p; T = 1 for greedy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpd_megatron.cli import run_cli
from hpd_megatron.data.files import check_outputs, staged_files
from hpd_megatron.eval import benchmarks
from hpd_megatron.eval.answers import avg_at_k, judge
from hpd_megatron.eval.benchmarks import Benchmarks, benchmark_table, format_table, load_benchmarks
from hpd_megatron.eval.runner import (
    GenerationJob,
    GenerationRun,
    add_generation_arguments,
    describe_run,
    inspect_job,
    job_from_arguments,
    run_generation,
)
from hpd_megatron.eval.source import CheckpointInfo
from hpd_megatron.eval.tracking import log_evaluation, tracking_target
from hpd_megatron.tracking import TrackingConfig, redact

GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
TRACKED_PARAMS = (
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "checkpoint",
    "layout",
    "context_length",
)
"""The summary's settings logged as the MLflow run's parameters (with the data files and
each benchmark's k)."""


def score(run: GenerationRun) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-reply rows and the metrics pooled over every prompt (replies, prompts and tokens
    alike); ``benchmarks.benchmark_table`` splits the rows by benchmark."""
    rows, by_prompt = [], {}
    entropy_sum = tokens = 0.0
    for reply in run.replies:
        generation = reply.generation
        verdict = judge(reply.text, reply.record.reference or "")
        by_prompt.setdefault((reply.record.path, reply.record.line), []).append(verdict.correct)
        entropy_sum += sum(generation.entropies)
        tokens += len(generation.tokens)
        rows.append(
            {
                "benchmark": reply.record.benchmark,
                "line": reply.record.line,
                "sample": reply.sample,
                "prompt": reply.record.prompt,
                "response": reply.text,
                "reference": reply.record.reference,
                "extracted": verdict.extracted,
                "correct": verdict.correct,
                "stage": verdict.stage,
                "prompt_tokens": reply.prompt_tokens,
                "response_tokens": len(generation.tokens),
                "finish": generation.finish,
                "entropy": sum(generation.entropies) / len(generation.entropies),
            }
        )
    k = max(len(samples) for samples in by_prompt.values())
    metrics = {
        f"avg@{k}": avg_at_k(list(by_prompt.values())),
        "mean_response_tokens": tokens / len(rows),
        "token_entropy": entropy_sum / tokens,
        "no_answer_share": sum(row["extracted"] is None for row in rows) / len(rows),
        "unfinished_share": sum(row["finish"] != "eos" for row in rows) / len(rows),
    }
    return rows, metrics


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the evaluation; the summary on rank 0, None on the other ranks."""
    greedy = args.temperature == 0
    job = dataclasses.replace(
        job_from_arguments(args, require_answer=True),
        data=" ".join(args.data),
        samples=args.samples or 1,
        top_p=args.top_p if args.top_p is not None else (1.0 if greedy else benchmarks.TOP_P),
    )
    job.check()  # the settings before the files
    # Rank 0 speaks; the process group does not exist yet, so ask torchrun's variable.
    say = print if os.environ.get("RANK", "0") == "0" else _quiet
    found = load_benchmarks(args.data, args.samples, greedy, args.limit, say)
    job = dataclasses.replace(
        job, samples=max(b.k for b in found.benchmarks), records=found.records
    )
    info = inspect_job(job)
    # Decided on every rank before any process group exists, so a bad tracking section
    # fails all ranks alike and nothing is generated in vain.
    tracking = (
        None if args.no_tracking else tracking_target(info, args.tracking_uri, args.experiment)
    )
    names = "+".join(Path(path).stem for path in args.data)
    out = Path(args.out) if args.out else info.path.parent / f"eval_{info.path.name}_{names}"
    check_outputs(
        "--out",
        [out / GENERATIONS, out / SUMMARY],
        {f"--data {path}": path for path in args.data} | {"--tokenizer": info.tokenizer},
    )
    run = run_generation(job, info)
    if not run.is_writer:
        return None
    rows, metrics = score(run)
    table = benchmark_table(rows, found)
    summary = {
        **metrics,
        "benchmarks": table,
        "protocol": protocol(job, found),
        "input_problems": found.problems,
        "data": args.data,
        "samples": job.samples,
        "temperature": job.temperature,
        "top_p": job.top_p,
        "max_new_tokens": job.max_new_tokens,
        "seed": job.seed,
        **describe_run(run),
    }
    with staged_files([out / GENERATIONS, out / SUMMARY]) as (generations, summary_file):
        generations.write_text("".join(json.dumps(row) + "\n" for row in rows))
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(table), flush=True)
    print(json.dumps(metrics), flush=True)
    print(f"wrote {out / GENERATIONS} and {out / SUMMARY}", flush=True)
    if tracking is not None:
        track(tracking, args, info, out, summary)
    return summary


def _quiet(_message: str) -> None:
    """The other ranks read the same files; rank 0 reports their problems."""


def protocol(job: GenerationJob, found: Benchmarks) -> dict[str, Any]:
    """The sampling settings every benchmark ran with, and each benchmark's k."""
    return {
        "temperature": job.temperature,
        "top_p": job.top_p,
        "max_new_tokens": job.max_new_tokens,
        "samples": {benchmark.name: benchmark.k for benchmark in found.benchmarks},
    }


def tracked_metrics(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The table as MLflow metrics: ``eval/<benchmark>/avg_at_<k>``, ``.../stderr``, ...
    (MLflow metric names allow no "@"); a standard error that does not exist is left out."""
    metrics = {}
    for name, entry in table.items():
        for key, value in entry.items():
            if key in ("k", "skipped_overlong") or value is None:
                continue
            if key == "avg@k":
                key = f"avg_at_{entry['k']}" if "k" in entry else "avg_at_k"
            metrics[f"eval/{name}/{key}"] = value
    return metrics


def track(
    tracking: TrackingConfig,
    args: argparse.Namespace,
    info: CheckpointInfo,
    out: Path,
    summary: dict[str, Any],
) -> None:
    """The summary into MLflow, as a child run of the checkpoint's training run."""
    names = list(summary["protocol"]["samples"])
    run_id = log_evaluation(
        tracking,
        f"eval-{'+'.join(names)}",
        out,
        params={
            **{key: summary[key] for key in TRACKED_PARAMS},
            "data": " ".join(summary["data"]),
            **{f"k/{name}": k for name, k in summary["protocol"]["samples"].items()},
        },
        metrics=tracked_metrics(summary["benchmarks"]),
        step=info.step or 0,
        parent_run_id=args.run_id or info.tracking_run_id,
        tags={"hpd.evaluated_checkpoint": str(info.path)},
        artifacts=[out / SUMMARY],
    )
    print(f"logged to {redact(tracking.tracking_uri)} (run {run_id})", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_arguments(parser, benchmarks=True)
    # The paper's protocol; --samples: each benchmark's k (eval/benchmarks.py), 1 if greedy;
    # --top-p: 0.95, 1 if greedy.
    parser.set_defaults(
        samples=None,
        temperature=benchmarks.TEMPERATURE,
        top_p=None,
        max_new_tokens=benchmarks.MAX_NEW_TOKENS,
    )
    parser.add_argument(
        "--out", help="output directory (default: eval_<ckpt>_<data> beside the checkpoint)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI; never one the checkpoint names)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: the training run's)")
    parser.add_argument(
        "--run-id", help="the training run to nest the evaluation under (default: the checkpoint's)"
    )
    parser.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
