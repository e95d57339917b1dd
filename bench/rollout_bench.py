"""What on-policy data costs: HPD steps with rollouts against the off-policy HPD step.

    python bench/rollout_bench.py --json OUT [--repeats 5] [--max-new-tokens 32]

One process (TP1 PP1, the CPU or one GPU) trains the tiny models of recipes/tiny_cpu.yaml
(student 2 x 96, teacher 4 x 192, vocabulary 128) with loss.method hpd on the arithmetic
task (seq_length 96, global batch 16, micro-batch 4) through the real trainer. Each round
runs one ``train_step`` per variant, interleaved so machine noise hits all of them alike:

  off-policy   rollout.fraction 0 (today's HPD step: the data prefix, one sample yh)
  lambda 0.25  a quarter of the batch answered by the student first
  lambda 1     every sample answered by the student first

The reported ratios are median(step) / median(off-policy step); the rollout share is
median(rollout seconds) / median(step seconds), from the steps' own time split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = {"off-policy": 0.0, "lambda 0.25": 0.25, "lambda 1": 1.0}


def prepare_inputs(root: Path) -> tuple[str, str]:
    """The arithmetic task's data and random tiny-teacher weights; (data prefix, teacher)."""
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.data import prepare
    from hpd_megatron.data.arithmetic import write_task
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    write_task(root, num_train=256, num_test=8, seed=0, max_digits=3, tokenizer_vocab_size=128)
    prepare(root / "train.jsonl", root / "tokenizer.model", root / "train", 96, log=lambda _: None)
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    teacher = ModelDescription.from_yaml(ROOT / "recipes/models/tiny_teacher.yaml")
    save_model_weights(build_gpt_model(teacher, transformer_config(teacher)), root / "teacher")
    destroy_parallel()
    return str(root / "train"), str(root / "teacher")


def time_steps(trainer, makers: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per variant, each round's step, rollout and teacher seconds; the first round is
    dropped."""
    keys = {"step_s": "step_time_s", "rollout_s": "time/rollout_s", "teacher_s": "time/teacher_s"}
    results = {name: {key: [] for key in keys} for name in makers}
    step = 0
    for repeat in range(repeats + 1):
        for name, maker in makers.items():
            step += 1
            trainer.rollouts = maker
            metrics = trainer.train_step(step).metrics
            if repeat:
                for key, metric in keys.items():
                    results[name][key].append(metrics.get(metric, 0.0))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from hpd_megatron.training.config import RolloutConfig, load_run_config
    from hpd_megatron.training.rollout import RolloutMaker
    from hpd_megatron.training.trainer import DistillationTrainer

    with tempfile.TemporaryDirectory() as scratch:
        data, teacher = prepare_inputs(Path(scratch))
        run = load_run_config(
            str(ROOT / "recipes/tiny_cpu.yaml"),
            [
                f"run_dir={scratch}/run",
                f"data.train={data}",
                f"teacher.checkpoint={teacher}",
                "parallel.pipeline_model_parallel_size=1",
                "checkpoint.export_dir=null",
                "tracking.enabled=false",
                "schedule.train_steps=1000",
            ],
        )
        trainer = DistillationTrainer(run)
        try:
            makers = {
                name: None
                if fraction == 0
                else RolloutMaker(
                    RolloutConfig(fraction=fraction, max_new_tokens=args.max_new_tokens),
                    trainer.feed.dataset,
                    run.seed,
                    trainer.student_description.vocab_size,
                    trainer.feed.dataset.meta["tokenizer"]["eos_id"],
                )
                for name, fraction in FRACTIONS.items()
            }
            results = time_steps(trainer, makers, args.repeats)
        finally:
            trainer.close()
    write_report(args, results)
    return 0


def write_report(args: argparse.Namespace, results: dict) -> None:
    import torch

    baseline = statistics.median(results["off-policy"]["step_s"])
    report = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        + ("cuda" if torch.cuda.is_available() else "cpu"),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "variants": {
            name: {
                "median_step_s": statistics.median(times["step_s"]),
                "ratio_to_off_policy": statistics.median(times["step_s"]) / baseline,
                "median_rollout_s": statistics.median(times["rollout_s"]),
                "median_teacher_s": statistics.median(times["teacher_s"]),
                "rollout_share": statistics.median(times["rollout_s"])
                / statistics.median(times["step_s"]),
                "step_s": times["step_s"],
            }
            for name, times in results.items()
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report["variants"].items():
        print(
            f"{name:12s} step {row['median_step_s']:.3f} s  x{row['ratio_to_off_policy']:.2f} "
            f"of off-policy  rollout {row['median_rollout_s']:.3f} s ({row['rollout_share']:.0%})"
            f"  teacher {row['median_teacher_s']:.3f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
