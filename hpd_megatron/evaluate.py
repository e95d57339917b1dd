"""Evaluate a checkpoint on math prompts: generate, extract answers, avg@k, length, entropy.

    torchrun --nproc-per-node N -m hpd_megatron.evaluate --ckpt DIR --data FILE.jsonl \\
        [--tp T --pp P] [--samples k --temperature T --top-p P --max-new-tokens N] [--out DIR]

Writes ``OUT/generations.jsonl`` (one line per reply: the prompt, the reply, the extracted
and reference answers, correctness, token count, finish reason, mean entropy) and
``OUT/summary.json`` (avg@k, mean reply length in tokens, token entropy, the settings),
both staged and renamed at the end; OUT defaults to ``eval_<ckpt name>_<data name>``
beside the checkpoint. With tracking (see ``eval/tracking.py``) the summary also goes to
MLflow as a child run of the checkpoint's training run.

Reply length counts generated tokens including the EOS that ends a reply; token entropy
is the mean, over those tokens, of the entropy (nats) of the distribution each was drawn
from (``softmax(logits / T)`` before top-p; T = 1 for greedy).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpd_megatron.cli import run_cli
from hpd_megatron.data.files import check_outputs, staged_files
from hpd_megatron.eval.answers import answers_match, avg_at_k, extract_answer
from hpd_megatron.eval.runner import (
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
    "data",
    "samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "checkpoint",
    "layout",
    "context_length",
)
"""The summary's settings logged as the MLflow run's parameters."""


def score(run: GenerationRun) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-reply rows and the summary's metrics (replies, prompts and tokens alike)."""
    rows, by_prompt = [], {}
    entropy_sum = tokens = 0.0
    for reply in run.replies:
        generation = reply.generation
        extracted = extract_answer(reply.text)
        correct = answers_match(extracted, reply.record.reference)
        by_prompt.setdefault(reply.record.line, []).append(correct)
        entropy_sum += sum(generation.entropies)
        tokens += len(generation.tokens)
        rows.append(
            {
                "line": reply.record.line,
                "sample": reply.sample,
                "prompt": reply.record.prompt,
                "response": reply.text,
                "reference": reply.record.reference,
                "extracted": extracted,
                "correct": correct,
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
    job = job_from_arguments(args, require_answer=True)
    info = inspect_job(job)
    # Decided on every rank before any process group exists, so a bad tracking section
    # fails all ranks alike and nothing is generated in vain.
    tracking = (
        None if args.no_tracking else tracking_target(info, args.tracking_uri, args.experiment)
    )
    out = (
        Path(args.out)
        if args.out
        else info.path.parent / f"eval_{info.path.name}_{Path(job.data).stem}"
    )
    check_outputs(
        "--out",
        [out / GENERATIONS, out / SUMMARY],
        {"--data": job.data, "--tokenizer": info.tokenizer},
    )
    run = run_generation(job, info)
    if not run.is_writer:
        return None
    rows, metrics = score(run)
    summary = {
        **metrics,
        "data": job.data,
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
    print(json.dumps(metrics), flush=True)
    print(f"wrote {out / GENERATIONS} and {out / SUMMARY}", flush=True)
    if tracking is not None:
        track(tracking, args, info, out, summary, metrics)
    return summary


def track(
    tracking: TrackingConfig,
    args: argparse.Namespace,
    info: CheckpointInfo,
    out: Path,
    summary: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """The summary into MLflow, as a child run of the checkpoint's training run."""
    name = Path(summary["data"]).stem
    run_id = log_evaluation(
        tracking,
        f"eval-{name}",
        out,
        params={key: summary[key] for key in TRACKED_PARAMS},
        # MLflow metric names allow no "@".
        metrics={
            f"eval/{name}/{key.replace('@', '_at_')}": value for key, value in metrics.items()
        },
        step=info.step or 0,
        parent_run_id=args.run_id or info.tracking_run_id,
        tags={"hpd.evaluated_checkpoint": str(info.path)},
        artifacts=[out / SUMMARY],
    )
    print(f"logged to {redact(tracking.tracking_uri)} (run {run_id})", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_arguments(parser)
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
