"""`make demo`: the whole recipe on the embedded default, on this machine's CPUs.

1. write the synthetic arithmetic task (seeded) and train a SentencePiece tokenizer on it;
2. tokenize it into Megatron indexed datasets with response-only loss masks;
3. SFT-train the tiny teacher (recipes/tiny_cpu_teacher.yaml, TP=2, 2 gloo ranks);
4. HPD-distil a smaller student from it (recipes/tiny_cpu.yaml, PP=2, 2 gloo ranks);
5. print a summary of both loss curves.

Each training stage is the same `torchrun -m hpd_megatron.train` a user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hpd_megatron.data import prepare
from hpd_megatron.data.arithmetic import write_task
from hpd_megatron.training.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
TEACHER_RECIPE = ROOT / "recipes" / "tiny_cpu_teacher.yaml"
STUDENT_RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"


def _torchrun(recipe: Path, ranks: int, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "hpd_megatron.train", "--config", str(recipe),
               *overrides]
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _curve(run_dir: str, key: str) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def _summary(name: str, values: list[float]) -> str:
    tenth = max(len(values) // 10, 1)
    first = sum(values[:tenth]) / tenth
    last = sum(values[-tenth:]) / tenth
    return f"{name}: {first:.3f} (first {tenth} steps) -> {last:.3f} (last {tenth} steps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override both stages' train_steps")
    parser.add_argument("--train-problems", type=int, default=2000)
    args = parser.parse_args()
    overrides = [f"schedule.train_steps={args.steps}"] if args.steps else []
    teacher_run = load_run_config(TEACHER_RECIPE, overrides)
    student_run = load_run_config(STUDENT_RECIPE, overrides)
    start = time.perf_counter()

    data_dir = Path(teacher_run.data.train).parent
    print(f"[1/4] arithmetic task ({args.train_problems} problems) and a SentencePiece tokenizer "
          f"-> {data_dir}", flush=True)
    write_task(data_dir, num_train=args.train_problems, num_test=200, seed=0, max_digits=3,
               tokenizer_vocab_size=teacher_run.student.description("student").vocab_size)
    print("[2/4] tokenize, mask prompts, write indexed datasets", flush=True)
    prepare(data_dir / "train.jsonl", data_dir / "tokenizer.model", teacher_run.data.train,
            seq_length=teacher_run.data.seq_length)

    print("[3/4] SFT of the tiny teacher at TP=2", flush=True)
    _torchrun(TEACHER_RECIPE, 2, overrides)
    print("[4/4] HPD distillation of the student at PP=2 (teacher and student share the pipeline)",
          flush=True)
    _torchrun(STUDENT_RECIPE, 2, overrides)

    print("\nsummary (token means over supervised response tokens):")
    print("  " + _summary("teacher SFT cross-entropy", _curve(teacher_run.run_dir, "cross_entropy")))
    print("  " + _summary("student cross-entropy on the data", _curve(student_run.run_dir, "cross_entropy")))
    print("  " + _summary("student HPD objective", _curve(student_run.run_dir, "loss")))
    negative = _curve(student_run.run_dir, "hpd/a_negative")
    print("  " + _summary("share of positions with A < 0 (teacher below student on the data token)",
                          negative))
    print(f"  weights: teacher {teacher_run.checkpoint.export_dir}, student "
          f"{student_run.checkpoint.export_dir}; metrics: <run_dir>/metrics.jsonl")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
