"""The demo's study: one teacher, five students, the same start, data and steps.

    torchrun --nproc-per-node 1 -m hpd_megatron.study \\
        --teacher runs/tiny_cpu/teacher_sft/export --task runs/tiny_cpu/data \\
        --out runs/tiny_cpu/study [--long]

In ONE process (each Megatron start-up costs 10-20 s on a small CPU machine):

1. the teacher answers the first ``prompts`` training problems greedily; its finished
   replies, prepared like any data set, are every student's off-policy data (sequence-level
   KD for ``sft``, as the paper's code task);
2. the students' shared start: the student, SFT-trained for ``start_steps`` on the task's
   reference solutions (as the paper's students are instruction-tuned models, not random
   ones) and exported; every method loads it (``checkpoint.load``), so the runs differ
   only in the loss;
3. each method trains the student (recipes/tiny_cpu_study.yaml), saving every
   ``save_interval`` steps;
4. the teacher, the start and every checkpoint answer the first ``test_problems``
   held-out problems ``samples`` times at temperature 0.7, top-p 0.95 (avg@k and the
   entropy of the sampling distributions, as ``hpd_megatron.evaluate``), and the start and
   every checkpoint are compared with the teacher teacher-forced on the reference solutions
   of all held-out problems (``eval/divergence.py``).

Everything is written to ``OUT/study.json``; ``report.py`` makes the table and plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpd_megatron.checkpoint.training_state import iteration_dir
from hpd_megatron.cli import run_cli
from hpd_megatron.data import prepare
from hpd_megatron.data.files import staged_files
from hpd_megatron.errors import ConfigError
from hpd_megatron.eval.divergence import compare_with_teacher
from hpd_megatron.eval.runner import GenerationJob, run_generation
from hpd_megatron.eval.teacher_data import training_records
from hpd_megatron.evaluate import score
from hpd_megatron.study.report import RESULTS
from hpd_megatron.train import train
from hpd_megatron.training.config import load_run_config
from hpd_megatron.training.inputs import checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_cpu_study.yaml"
METHODS = ("sft", "fkl", "rkl", "jsd", "hpd")
STUDY_MARKER = ".hpd-study"
"""Marks a directory this tool created, the only kind ``--out`` may replace."""


@dataclass
class StudyPlan:
    teacher: str
    """The teacher's weights (an export)."""
    task: str
    """The arithmetic task's directory: train.jsonl, test.jsonl, tokenizer.model."""
    out: str
    steps: int = 100
    save_interval: int = 50
    start_steps: int = 200
    """SFT steps of the shared start on the reference solutions (batch 32, lr 3e-3)."""
    prompts: int = 512
    """Training problems the teacher answers (the students' data)."""
    test_problems: int = 100
    samples: int = 2
    """For a fixed number of replies, more problems and fewer samples each estimate accuracy
    with less variance: most of it is between problems."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 56
    """The demo's two-digit additions have reference solutions of 44 tokens on average; a reply
    that does not end within this is dropped from the data (``training_records``) and
    prompt plus reply stay within the recipe's seq_length (80)."""
    methods: tuple[str, ...] = METHODS


LONG = {"steps": 400, "save_interval": 100, "prompts": 2048, "test_problems": 200, "samples": 4}


def quiet(_message: str) -> None:
    """Generation's per-batch progress lines would drown the study's own."""


def _prepare(plan: StudyPlan, jsonl: Path, prefix: Path, seq_length: int) -> None:
    """``jsonl`` tokenized with the task's tokenizer into the indexed datasets at ``prefix``."""
    prepare(jsonl, Path(plan.task) / "tokenizer.model", prefix, seq_length=seq_length, log=quiet)


def teacher_data(plan: StudyPlan, prefix: Path, seq_length: int) -> dict[str, Any]:
    """Greedy teacher replies to the first ``plan.prompts`` training problems, prepared at
    ``prefix``; returns how many were kept and how many of them are correct."""
    job = GenerationJob(
        ckpt=plan.teacher,
        data=str(Path(plan.task) / "train.jsonl"),
        limit=plan.prompts,
        max_new_tokens=plan.max_new_tokens,
        batch_size=128,
        require_answer=False,
    )
    run = run_generation(job, log=quiet)
    records, dropped = training_records(run.replies)
    correct, _ = training_records(run.replies, only_correct=True)
    jsonl = prefix.with_suffix(".jsonl")
    with staged_files([jsonl]) as (out,):
        out.write_text("".join(json.dumps(record) + "\n" for record in records))
    _prepare(plan, jsonl, prefix, seq_length)
    return {
        "replies": len(run.replies),
        "kept": len(records),
        "dropped_unfinished": dropped["unfinished"],
        "correct": len(correct),
        "seconds": round(run.elapsed_s, 1),
    }


def start_export(out: Path) -> Path:
    """The shared start's weights: an export inside its run directory, where evaluation
    finds the run's tokenizer (``eval/source.py``)."""
    return out / "start" / "export"


def train_start(plan: StudyPlan, out: Path, seq_length: int) -> dict[str, Any]:
    """The students' shared start: the student SFT-trained on the task's reference solutions
    for ``plan.start_steps``, exported to ``start_export(out)``."""
    _prepare(plan, Path(plan.task) / "train.jsonl", out / "data" / "reference", seq_length)
    run = load_run_config(
        RECIPE,
        [
            f"data.train={out / 'data' / 'reference'}",
            "loss.method=sft",
            f"run_dir={out / 'start'}",
            f"schedule.train_steps={plan.start_steps}",
            "optimizer.lr=3e-3",
            "schedule.global_batch_size=32",
            "schedule.micro_batch_size=32",
            "checkpoint.save_interval=0",
            f"checkpoint.export_dir={start_export(out)}",
        ],
    )
    history = train(run)
    return {
        "steps": plan.start_steps,
        "final_cross_entropy": history[-1].get("cross_entropy"),
        "seconds": round(sum(row["step_time_s"] for row in history), 1),
    }


def evaluate(checkpoint: str | Path, plan: StudyPlan) -> dict[str, float]:
    """avg@k, token entropy and reply length on the held-out problems (``evaluate.score``)."""
    job = GenerationJob(
        ckpt=str(checkpoint),
        data=str(Path(plan.task) / "test.jsonl"),
        limit=plan.test_problems,
        samples=plan.samples,
        temperature=plan.temperature,
        top_p=plan.top_p,
        max_new_tokens=plan.max_new_tokens,
        batch_size=128,
    )
    return scored(job)


def scored(job: GenerationJob) -> dict[str, float]:
    """The job's replies scored (``evaluate.score``), avg@k named ``accuracy``."""
    _, metrics = score(run_generation(job, log=quiet))
    return {
        ("accuracy" if key.startswith("avg@") else key): value for key, value in metrics.items()
    }


class PhaseClock:
    """Wall seconds of each stage of the study: where its time goes."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.phases: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.mark, 1)
        self.mark = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def study_data(plan: StudyPlan, out: Path, seq_length: int) -> dict[str, Any]:
    """Stage 1: the teacher's replies as the students' data, and the held-out problems
    prepared for the KL comparison; returns ``teacher_data``'s counts."""
    print(f"[study 1/4] teacher replies to {plan.prompts} training problems (greedy)", flush=True)
    counts = teacher_data(plan, out / "data" / "teacher", seq_length)
    print(f"  {counts}", flush=True)
    _prepare(plan, Path(plan.task) / "test.jsonl", out / "data" / "heldout", seq_length)
    return counts


def train_students(plan: StudyPlan, out: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Stage 3: every method trains the shared start on the teacher's data; returns each
    method's numbers (with its checkpoints' steps) and its checkpoint directory."""
    common = [
        f"data.train={out / 'data' / 'teacher'}",
        f"teacher.checkpoint={plan.teacher}",
        f"schedule.train_steps={plan.steps}",
        f"checkpoint.save_interval={plan.save_interval}",
        f"checkpoint.load={start_export(out)}",
    ]
    steps = list(range(plan.save_interval, plan.steps + 1, plan.save_interval))
    if plan.steps % plan.save_interval:
        steps.append(plan.steps)
    students: dict[str, Any] = {}
    directories: dict[str, Path] = {}
    for i, method in enumerate(plan.methods, 1):
        print(
            f"[study 3/4] student {i}/{len(plan.methods)}: {method}, {plan.steps} steps", flush=True
        )
        run = load_run_config(RECIPE, [*common, f"loss.method={method}", f"run_dir={out / method}"])
        history = train(run)
        directories[method] = checkpoint_dir(run)
        students[method] = {
            "seconds_per_step": statistics.median(row["step_time_s"] for row in history),
            "final_cross_entropy": history[-1].get("cross_entropy"),
            "checkpoints": [{"step": step} for step in steps],
        }
    return students, directories


def evaluate_all(
    plan: StudyPlan,
    out: Path,
    results: dict[str, Any],
    students: dict[str, Any],
    directories: dict[str, Path],
) -> list[tuple[dict[str, Any], Path]]:
    """Stage 4a: the teacher, the start and every student checkpoint answer the held-out
    problems (into ``results`` and the checkpoints' entries); returns each student-side
    entry with its weights, the start first."""
    checkpoints = sum(len(student["checkpoints"]) for student in students.values())
    print(
        f"[study 4/4] evaluating the teacher, the start and {checkpoints} student checkpoints "
        f"on {plan.test_problems} held-out problems x {plan.samples} samples",
        flush=True,
    )
    results["teacher"] = evaluate(plan.teacher, plan)
    results["start"] = evaluate(start_export(out), plan)
    print(
        f"  teacher: accuracy {results['teacher']['accuracy']:.3f}; start: accuracy "
        f"{results['start']['accuracy']:.3f}",
        flush=True,
    )
    entries = [(results["start"], start_export(out))]
    for method, student in students.items():
        for checkpoint in student["checkpoints"]:
            path = iteration_dir(directories[method], checkpoint["step"])
            checkpoint.update(evaluate(path, plan))
            entries.append((checkpoint, path))
        print(f"  {method}: accuracy {student['checkpoints'][-1]['accuracy']:.3f}", flush=True)
    return entries


def compare_all(
    plan: StudyPlan,
    out: Path,
    results: dict[str, Any],
    entries: list[tuple[dict[str, Any], Path]],
    seq_length: int,
) -> None:
    """Stage 4b: KL(teacher || student) and the entropies, teacher-forced on the held-out
    reference solutions, into ``results`` and the entries."""
    print("  KL(teacher || student) on the held-out reference solutions", flush=True)
    compared = compare_with_teacher(
        plan.teacher,
        load_run_config(RECIPE).student.description("student"),
        [path for _, path in entries],
        out / "data" / "heldout",
        seq_length,
    )
    for (entry, _), numbers in zip(entries, compared["students"]):
        entry["kl_to_teacher"] = numbers["kl_to_teacher"]
        entry["heldout_entropy"] = numbers["entropy"]
    results["teacher"]["heldout_entropy"] = compared["teacher_entropy"]
    results["heldout_tokens"] = compared["tokens"]


def fresh_output(out: Path) -> None:
    """Make ``out`` an empty study directory (with its marker and data/).

    A run whose checkpoint directory holds a save would resume from it, so a previous
    study's output is removed first; anything else already there is refused, never deleted.
    """
    if out.exists():
        if (out / STUDY_MARKER).is_file():
            shutil.rmtree(out)
        elif not out.is_dir() or any(out.iterdir()):
            raise ConfigError(
                f"--out {out}: exists and is not a previous study's output (no {STUDY_MARKER}); "
                "remove it or choose another --out"
            )
    (out / "data").mkdir(parents=True)
    (out / STUDY_MARKER).write_text("written by python -m hpd_megatron.study\n")


def run_study(plan: StudyPlan) -> dict[str, Any]:
    """Every stage of the study (module doc); writes and returns ``OUT/study.json``'s data."""
    out = Path(plan.out)
    fresh_output(out)
    seq_length = load_run_config(RECIPE).data.seq_length
    clock = PhaseClock()
    results: dict[str, Any] = {"plan": asdict(plan), "k": plan.samples}
    results["teacher_data"] = study_data(plan, out, seq_length)
    clock.done("teacher_data")
    print(
        f"[study 2/4] the students' shared start: {plan.start_steps} SFT steps on the reference "
        "solutions",
        flush=True,
    )
    results["start_training"] = train_start(plan, out, seq_length)
    clock.done("start")
    students, directories = train_students(plan, out)
    clock.done("students")
    entries = evaluate_all(plan, out, results, students, directories)
    clock.done("generation")
    compare_all(plan, out, results, entries, seq_length)
    clock.done("kl")
    results["phase_seconds"] = clock.phases
    results["students"] = students
    results["seconds"] = clock.total()
    with staged_files([out / RESULTS]) as (file,):
        file.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--long", action="store_true", help=f"the longer study: {LONG}")
    parser.add_argument("--steps", type=int, help="student steps (default 100, 400 with --long)")
    parser.add_argument(
        "--start-steps", type=int, help="SFT steps of the shared start (default 200)"
    )
    args = parser.parse_args(argv)
    plan = StudyPlan(args.teacher, args.task, args.out, **(LONG if args.long else {}))
    if args.steps:
        plan.steps = args.steps
        plan.save_interval = min(plan.save_interval, args.steps)
    if args.start_steps:
        plan.start_steps = args.start_steps
    run_study(plan)


if __name__ == "__main__":
    run_cli(main)
