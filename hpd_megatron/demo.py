"""`make demo`: train a tiny teacher, distil it five ways, compare the students in one table.

1. write the synthetic arithmetic task (seeded) and train a SentencePiece tokenizer on it;
2. tokenize it into Megatron indexed datasets with response-only loss masks;
3. SFT-train the teacher (recipes/tiny_cpu_teacher.yaml);
4. the study (hpd_megatron/study/experiment.py, one process): the teacher's own replies
   become the students' data, and sft, fkl, rkl, jsd and hpd each train the same start (a
   briefly SFT-trained student) for the same steps; every checkpoint is evaluated on
   held-out problems;
5. print the table and write the plot (hpd_megatron/study/report.py).

Each training stage is the same `hpd_megatron.train` a user runs. `--long` runs a longer
study (a longer-trained teacher; more student steps, data, problems and samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hpd_megatron.cli import run_cli
from hpd_megatron.data import prepare
from hpd_megatron.data.arithmetic import write_task
from hpd_megatron.study.report import RESULTS, format_table, plot_curves
from hpd_megatron.training.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parent.parent
TEACHER_RECIPE = ROOT / "recipes" / "tiny_cpu_teacher.yaml"
STUDY_DIR = Path("runs/tiny_cpu/study")
# Additions of two two-digit numbers: replies of 44 tokens on average (records of about 60
# with prompt and chat format, none truncated at SEQ_LENGTH). A 4-layer teacher learns them
# in the recipe's 300 steps (about 2 minutes here); the mixed +, -, * task of
# hpd_megatron/data/arithmetic.py needs thousands. --long trains the teacher longer.
TASK = {"min_digits": 2, "max_digits": 2, "ops": ("+",)}
TRAIN_PROBLEMS = 4000
SEQ_LENGTH = 80
LONG_TEACHER_STEPS = 1000


def _torchrun(ranks: int, arguments: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        *arguments,
    ]
    print("$ " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--long",
        action="store_true",
        help="the longer study (teacher steps and study/experiment.py LONG)",
    )
    parser.add_argument("--train-problems", type=int, default=TRAIN_PROBLEMS)
    return parser.parse_args()


def write_data(teacher_run: RunConfig, train_problems: int) -> Path:
    """Stages 1 and 2: the task, its tokenizer and the teacher's indexed datasets; returns
    the task's directory."""
    data_dir = Path(teacher_run.data.train).parent
    print(
        f"[1/5] arithmetic task ({train_problems} problems) and a SentencePiece tokenizer "
        f"-> {data_dir}",
        flush=True,
    )
    write_task(
        data_dir,
        num_train=train_problems,
        num_test=200,
        seed=0,
        tokenizer_vocab_size=teacher_run.student.description("student").vocab_size,
        **TASK,
    )
    print("[2/5] tokenize, mask prompts, write indexed datasets", flush=True)
    prepare(
        data_dir / "train.jsonl",
        data_dir / "tokenizer.model",
        teacher_run.data.train,
        seq_length=SEQ_LENGTH,
    )
    return data_dir


def report(start: float) -> None:
    """Stage 5: the table (printed and written beside the numbers) and the plot."""
    print("[5/5] results", flush=True)
    results = json.loads((STUDY_DIR / RESULTS).read_text())
    table = format_table(results)
    (STUDY_DIR / "table.md").write_text(table + "\n")
    plot_curves(results, STUDY_DIR / "study.png")
    print(f"\n{table}\n")
    print(f"teacher data: {results['teacher_data']}")
    print(f"numbers: {STUDY_DIR / RESULTS}; plot: {STUDY_DIR / 'study.png'}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def main() -> None:
    args = _parse_arguments()
    overrides = [
        f"data.seq_length={SEQ_LENGTH}",
        *([f"schedule.train_steps={LONG_TEACHER_STEPS}"] if args.long else []),
    ]
    teacher_run = load_run_config(TEACHER_RECIPE, overrides)
    start = time.perf_counter()
    data_dir = write_data(teacher_run, args.train_problems)
    print(f"[3/5] SFT of the teacher, {teacher_run.schedule.train_steps} steps", flush=True)
    _torchrun(1, ["-m", "hpd_megatron.train", "--config", str(TEACHER_RECIPE), *overrides])
    print("[4/5] the study: five students from the teacher's replies (one process)", flush=True)
    study = ["--teacher", teacher_run.checkpoint.export_dir, "--task", str(data_dir)]
    study += ["--out", str(STUDY_DIR), *(["--long"] if args.long else [])]
    _torchrun(1, ["-m", "hpd_megatron.study", *study])
    report(start)


if __name__ == "__main__":
    run_cli(main)
