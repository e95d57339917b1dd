"""`make study`: the tuned, repeated comparison of the methods (issue 20, docs/study.md).

    python -m hpd_megatron.study.protocol --out runs/study [--fresh]

In ONE process (a Megatron start-up costs 10-20 s on a small CPU machine), in stages that
are recorded in ``OUT/ledger.json`` as they finish, so that a rerun resumes after the last
finished run or evaluation:

1. the entropic task (``arithmetic.py`` with ``styles``): two-digit additions whose
   solutions are written in drawn wordings; a tokenizer; splits: test (the first
   ``test_problems`` held-out problems), validation (the next ``val_problems``, disjoint),
   the students' problems (the first ``prompts`` training problems, never seen by the
   teacher) and the teacher's training set (the rest);
2. the teacher (recipes/tiny_cpu_study_teacher.yaml), evaluated at temperature 1;
3. the two data regimes on the students' problems: ``teacher``, the teacher's own replies
   sampled at temperature 1 (carrying its entropy), and ``reference``, the task's reference
   solutions (not written by the teacher);
4. the students' shared start: the student SFT-trained on the teacher's training set;
5. per regime and method: one run per learning rate (seed 0), the best chosen on the
   validation problems (``select.py``), then the other seeds at that rate; every chosen run
   evaluated on the test problems, its KL to the teacher at every checkpoint, HPD's B share;
   the B variants in the first regime only; the on-policy methods (their data are their
   own rollouts) run once, last, for both tables;
6. the learning curve of each regime's best method on the test problems; the report.

Every evaluation samples at temperature 1 (top-p 1), the temperature the entropies are
compared at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpd_megatron.checkpoint.training_state import iteration_dir
from hpd_megatron.cli import run_cli
from hpd_megatron.data import prepare
from hpd_megatron.data.arithmetic import write_task
from hpd_megatron.data.files import staged_files
from hpd_megatron.eval.divergence import compare_with_teacher
from hpd_megatron.eval.runner import GenerationJob, run_generation
from hpd_megatron.eval.teacher_data import training_records
from hpd_megatron.evaluate import score
from hpd_megatron.study.bshare import b_gradient_share
from hpd_megatron.study.experiment import quiet, scored
from hpd_megatron.study.select import choose_lr, run_statistics, summarize_seeds
from hpd_megatron.train import train
from hpd_megatron.training.config import load_run_config
from hpd_megatron.training.inputs import checkpoint_dir

ROOT = Path(__file__).resolve().parents[2]
STUDENT_RECIPE = ROOT / "recipes" / "tiny_cpu_study_protocol.yaml"
TEACHER_RECIPE = ROOT / "recipes" / "tiny_cpu_study_teacher.yaml"
LEDGER = "ledger.json"
RESULTS = "study.json"

# Each method as the recipe overrides that make it. The on-policy ones answer their own
# prompts (rollout.fraction 1), so the data regime does not change them.
# In the order they run: the B question first, so that a study cut short still answers it.
METHODS: dict[str, list[str]] = {
    "hpd": ["loss.method=hpd"],
    "hpd_drop": ["loss.method=hpd", "loss.hpd_b=drop"],
    "hpd_bound": ["loss.method=hpd", "loss.hpd_b=bound", "loss.hpd_b_floor=-1.0"],
    "sft": ["loss.method=sft"],
    "jsd": ["loss.method=jsd"],
    "rkl": ["loss.method=rkl"],
    "fkl": ["loss.method=fkl"],
}
ON_POLICY: dict[str, list[str]] = {
    "opd": ["loss.method=opd", "rollout.fraction=1.0"],
    "gkd": ["loss.method=jsd", "rollout.fraction=1.0"],
}
HPD_B = {"hpd": "reference", "hpd_drop": "drop", "hpd_bound": "bound"}
B_VARIANTS = ("hpd_drop", "hpd_bound")
"""Run in the first regime only: the B question is about the entropy-rich teacher's data."""


@dataclass
class ProtocolPlan:
    out: str = "runs/study"
    train_problems: int = 4000
    test_problems: int = 200
    val_problems: int = 100
    samples: int = 2
    prompts: int = 512
    """The students' problems (both regimes), never in the teacher's training set."""
    teacher_steps: int = 1000
    start_steps: int = 400
    steps: int = 200
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = ("teacher", "reference")
    methods: tuple[str, ...] = tuple(METHODS)
    on_policy: tuple[str, ...] = tuple(ON_POLICY)
    max_new_tokens: int = 88
    """Styled replies have 80 tokens at most; prompt + reply stay within seq_length 112."""
    b_share_sequences: int = 64
    long_steps: int = 600
    long_methods: tuple[str, ...] = ("sft", "hpd")
    """Stage 7: these and each regime's best method, ``long_steps`` at their chosen lr, seed
    0: whether the best has plateaued, and whether the ranking holds when every run has."""
    long_every: int = 100
    budget_minutes: float = 80.0
    """No new (regime, method) starts after this long; the rest waits for a rerun."""
    extra: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """What has finished, by key, in ``OUT/ledger.json`` (written after every entry)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.entries:
            self.entries[key] = make()
            with staged_files([self.path]) as (file,):
                file.write_text(json.dumps(self.entries, indent=1) + "\n")
        return self.entries[key]


def say(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_splits(plan: ProtocolPlan, data: Path, seq_length: int) -> dict[str, Any]:
    """Stage 1: the task, its tokenizer and every split (module doc), prepared."""
    task = data / "task"
    held_out = plan.test_problems + plan.val_problems
    write_task(task, plan.train_problems, held_out, 0, 2, 112, 2, ("+",), styles=True)
    train_lines = (task / "train.jsonl").read_text().splitlines()
    test_lines = (task / "test.jsonl").read_text().splitlines()
    splits = {
        "test": test_lines[: plan.test_problems],
        "val": test_lines[plan.test_problems :],
        "reference": train_lines[: plan.prompts],
        "teacher_train": train_lines[plan.prompts :],
    }
    for name, lines in splits.items():
        (data / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    for name in ("test", "reference", "teacher_train"):
        _prepare(data, data / f"{name}.jsonl", data / name, seq_length)
    return {name: len(lines) for name, lines in splits.items()}


def _prepare(data: Path, jsonl: Path, prefix: Path, seq_length: int) -> dict[str, Any]:
    return prepare(jsonl, data / "task" / "tokenizer.model", prefix, seq_length, log=quiet)


def evaluate(
    plan: ProtocolPlan, checkpoint: Path | str, split: Path, greedy: bool = False
) -> dict[str, float]:
    """avg@k, sampling entropy (temperature 1) and reply length on ``split``'s problems;
    ``greedy``: one greedy reply per problem instead, the accuracy without sampling errors
    (which separates what a method taught from how much it sharpened the student)."""
    job = GenerationJob(
        ckpt=str(checkpoint),
        data=str(split),
        samples=1 if greedy else plan.samples,
        temperature=0.0 if greedy else 1.0,
        top_p=1.0,
        max_new_tokens=plan.max_new_tokens,
        batch_size=128,
    )
    return scored(job)


def train_teacher(plan: ProtocolPlan, out: Path) -> dict[str, Any]:
    """Stage 2: the teacher's SFT and its numbers on the test problems."""
    run = load_run_config(
        TEACHER_RECIPE,
        [
            f"data.train={out / 'data' / 'teacher_train'}",
            f"run_dir={out / 'teacher'}",
            f"checkpoint.export_dir={out / 'teacher' / 'export'}",
            f"schedule.train_steps={plan.teacher_steps}",
        ],
    )
    shutil.rmtree(out / "teacher", ignore_errors=True)  # an unfinished run would resume
    history = train(run)
    return {
        "steps": plan.teacher_steps,
        "seconds": round(sum(row["step_time_s"] for row in history), 1),
        "final_cross_entropy": history[-1].get("cross_entropy"),
        "test": evaluate(plan, out / "teacher" / "export", out / "data" / "test.jsonl"),
    }


def greedy_on_test(plan: ProtocolPlan, out: Path, name: str) -> dict[str, float]:
    """The teacher's or the start's greedy numbers on the test problems."""
    return evaluate(plan, out / name / "export", out / "data" / "test.jsonl", greedy=True)


def teacher_replies(plan: ProtocolPlan, out: Path, seq_length: int) -> dict[str, Any]:
    """Stage 3a: the teacher's replies to the students' problems, sampled at temperature 1
    (so that they carry its entropy), prepared as the ``teacher`` regime's data."""
    data = out / "data"
    job = GenerationJob(
        ckpt=str(out / "teacher" / "export"),
        data=str(data / "reference.jsonl"),
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=plan.max_new_tokens,
        batch_size=128,
        require_answer=False,
    )
    run = run_generation(job, log=quiet)
    records, dropped = training_records(run.replies)
    correct, _ = training_records(run.replies, only_correct=True)
    _jsonl(data / "teacher.jsonl", records)
    _prepare(data, data / "teacher.jsonl", data / "teacher", seq_length)
    _, metrics = score(run)
    return {
        "replies": len(run.replies),
        "kept": len(records),
        "dropped_unfinished": dropped["unfinished"],
        "correct": len(correct),
        "token_entropy": metrics["token_entropy"],
        "seconds": round(run.elapsed_s, 1),
    }


def train_start(plan: ProtocolPlan, out: Path) -> dict[str, Any]:
    """Stage 4: the shared start, SFT on the teacher's training set, exported."""
    run = load_run_config(
        STUDENT_RECIPE,
        [
            f"data.train={out / 'data' / 'teacher_train'}",
            "loss.method=sft",
            f"run_dir={out / 'start'}",
            f"schedule.train_steps={plan.start_steps}",
            "optimizer.lr=3e-3",
            "schedule.global_batch_size=32",
            "schedule.micro_batch_size=32",
            "checkpoint.save_interval=0",
            f"checkpoint.export_dir={out / 'start' / 'export'}",
        ],
    )
    shutil.rmtree(out / "start", ignore_errors=True)
    history = train(run)
    return {
        "steps": plan.start_steps,
        "seconds": round(sum(row["step_time_s"] for row in history), 1),
        "test": evaluate(plan, out / "start" / "export", out / "data" / "test.jsonl"),
    }


def student_run(
    plan: ProtocolPlan,
    out: Path,
    regime: str,
    method: str,
    lr: float,
    seed: int,
    steps: int | None = None,
) -> dict[str, Any]:
    """One student run of ``steps`` (None: ``plan.steps``); returns its step statistics and
    checkpoint directory."""
    steps = steps or plan.steps
    name = f"{regime}-{method}-lr{lr:g}-s{seed}" + ("" if steps == plan.steps else f"-{steps}")
    run_dir = out / "students" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run would resume
    overrides = [
        *(METHODS.get(method) or ON_POLICY[method]),
        f"data.train={out / 'data' / regime}",
        f"teacher.checkpoint={out / 'teacher' / 'export'}",
        f"checkpoint.load={out / 'start' / 'export'}",
        f"run_dir={run_dir}",
        f"optimizer.lr={lr}",
        f"seed={1234 + seed}",
        f"schedule.train_steps={steps}",
    ]
    if method in ON_POLICY:
        overrides.append(f"rollout.max_new_tokens={plan.max_new_tokens}")
    run = load_run_config(STUDENT_RECIPE, overrides)
    say(f"train {name}")
    history = train(run)
    return {
        **run_statistics(history, run.optimizer.clip_grad),
        "checkpoints": str(checkpoint_dir(run)),
    }


def tune_and_repeat(
    plan: ProtocolPlan, out: Path, ledger: Ledger, regime: str, method: str
) -> dict[str, Any]:
    """Stage 5 for one (regime, method): the lr sweep on validation, the seeds on test."""
    data = out / "data"
    key = f"{regime}/{method}"
    sweep = {}
    for lr in plan.lrs:
        run = ledger.get(
            f"{key}/lr{lr:g}/s{plan.seeds[0]}",
            lambda lr=lr: student_run(plan, out, regime, method, lr, plan.seeds[0]),
        )
        final = iteration_dir(Path(run["checkpoints"]), plan.steps)
        sweep[lr] = ledger.get(
            f"{key}/lr{lr:g}/val", lambda final=final: evaluate(plan, final, data / "val.jsonl")
        )
    lr = choose_lr({lr: numbers["accuracy"] for lr, numbers in sweep.items()})
    tried = ", ".join(f"{k:g}: {v['accuracy']:.3f}" for k, v in sweep.items())
    say(f"{key}: lr {lr:g} chosen on validation ({tried})")
    seeds = []
    for seed in plan.seeds:
        run = ledger.get(
            f"{key}/lr{lr:g}/s{seed}",
            lambda seed=seed: student_run(plan, out, regime, method, lr, seed),
        )
        final = iteration_dir(Path(run["checkpoints"]), plan.steps)
        test = ledger.get(
            f"{key}/lr{lr:g}/s{seed}/test",
            lambda final=final: evaluate(plan, final, data / "test.jsonl"),
        )
        greedy = ledger.get(
            f"{key}/lr{lr:g}/s{seed}/test_greedy",
            lambda final=final: evaluate(plan, final, data / "test.jsonl", greedy=True),
        )
        seeds.append({"seed": seed, **run, "test": test, "test_greedy": greedy})
    kl = ledger.get(f"{key}/kl", lambda: kl_curves(plan, out, seeds))
    for entry, curve in zip(seeds, kl):
        entry["kl_curve"] = curve
    result = {
        "validation": {f"{k:g}": v for k, v in sweep.items()},
        "lr": lr,
        "seeds": seeds,
        "summary": summarize_seeds(seeds),
    }
    if method in HPD_B:
        result["b_share"] = ledger.get(
            f"{key}/b_share", lambda: b_shares(plan, out, regime, seeds, HPD_B[method])
        )
    say(f"{key}: test {result['summary']['accuracy']}")
    return result


def checkpoint_steps(plan: ProtocolPlan) -> list[int]:
    interval = load_run_config(STUDENT_RECIPE).checkpoint.save_interval
    return list(range(interval, plan.steps + 1, interval))


def kl_curves(plan: ProtocolPlan, out: Path, seeds: list[dict]) -> list[list[dict]]:
    """KL(teacher || student) and entropy teacher-forced on the test references, at every
    checkpoint of every seed (the start at step 0)."""
    steps = checkpoint_steps(plan)
    paths = [out / "start" / "export"]
    for entry in seeds:
        paths += [iteration_dir(Path(entry["checkpoints"]), step) for step in steps]
    compared = compare_with_teacher(
        out / "teacher" / "export",
        load_run_config(STUDENT_RECIPE).student.description("student"),
        paths,
        out / "data" / "test",
        load_run_config(STUDENT_RECIPE).data.seq_length,
    )["students"]
    start, rest = compared[0], compared[1:]
    return [
        [{"step": 0, **start}]
        + [{"step": step, **rest[i * len(steps) + j]} for j, step in enumerate(steps)]
        for i in range(len(seeds))
    ]


def b_shares(
    plan: ProtocolPlan, out: Path, regime: str, seeds: list[dict], b_mode: str
) -> dict[str, Any]:
    """B's share of the logit gradient (``bshare.py``) on the regime's first sequences, at
    the start and at every seed's last checkpoint."""
    paths = [out / "start" / "export"]
    paths += [iteration_dir(Path(entry["checkpoints"]), plan.steps) for entry in seeds]
    shares = b_gradient_share(
        out / "teacher" / "export",
        load_run_config(STUDENT_RECIPE).student.description("student"),
        paths,
        out / "data" / regime,
        load_run_config(STUDENT_RECIPE).data.seq_length,
        b_mode,
        plan.b_share_sequences,
    )
    return {"start": shares[0], "final": shares[1:]}


def learning_curve(
    plan: ProtocolPlan, out: Path, runs: Sequence[dict[str, Any]], steps: Sequence[int]
) -> list[dict]:
    """Test avg@k of ``runs`` (a method's seeds) at the checkpoints of ``steps``, averaged
    over the runs (the start at step 0; the caller fills in its accuracy)."""
    start = {"step": 0, "accuracy": None}
    points = [start]
    for step in steps:
        values = [
            evaluate(
                plan,
                iteration_dir(Path(entry["checkpoints"]), step),
                out / "data" / "test.jsonl",
            )["accuracy"]
            for entry in runs
        ]
        points.append({"step": step, "accuracy": statistics.mean(values), "seeds": values})
    return points


def long_run(plan: ProtocolPlan, out: Path, regime: str, method: str, lr: float) -> dict:
    """Stage 7 for one method: a ``long_steps`` run (its own cosine schedule) at the chosen
    lr, seed 0, with test avg@k every ``long_every`` steps (the start at step 0)."""
    run = student_run(plan, out, regime, method, lr, plan.seeds[0], plan.long_steps)
    steps = range(plan.long_every, plan.long_steps + 1, plan.long_every)
    return {"lr": lr, "points": learning_curve(plan, out, [run], steps), **run}


def configurations(plan: ProtocolPlan) -> list[tuple[str, str]]:
    """(regime, method) in the order they run: every method in the first regime (the
    teacher's own replies, where the B question is asked), the other regimes without the B
    variants, then the on-policy methods (regime ``on_policy``), the costliest, last."""
    first, *rest = plan.regimes
    order = [(first, method) for method in plan.methods]
    order += [
        (regime, method) for regime in rest for method in plan.methods if method not in B_VARIANTS
    ]
    return order + [("on_policy", method) for method in plan.on_policy]


def run_protocol(plan: ProtocolPlan) -> dict[str, Any]:
    """Every stage (module doc); writes and returns ``OUT/study.json``'s data."""
    torch.set_num_threads(2)  # the study machine's cores; one process, no parallel runs
    out = Path(plan.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / LEDGER)
    clock = time.perf_counter()
    seq_length = load_run_config(STUDENT_RECIPE).data.seq_length
    results: dict[str, Any] = {"plan": asdict(plan), "k": plan.samples}
    say("1 the entropic task and its splits")
    results["splits"] = ledger.get("splits", lambda: write_splits(plan, out / "data", seq_length))
    say(f"2 the teacher, {plan.teacher_steps} steps")
    results["teacher"] = ledger.get("teacher", lambda: train_teacher(plan, out))
    results["teacher"]["test_greedy"] = ledger.get(
        "teacher/test_greedy", lambda: greedy_on_test(plan, out, "teacher")
    )
    say(f"  teacher: {results['teacher']['test']}, greedy {results['teacher']['test_greedy']}")
    say("3 the teacher's sampled replies (regime 'teacher')")
    results["teacher_data"] = ledger.get(
        "teacher_data", lambda: teacher_replies(plan, out, seq_length)
    )
    say(f"  {results['teacher_data']}")
    say(f"4 the shared start, {plan.start_steps} SFT steps")
    results["start"] = ledger.get("start", lambda: train_start(plan, out))
    results["start"]["test_greedy"] = ledger.get(
        "start/test_greedy", lambda: greedy_on_test(plan, out, "start")
    )
    say(f"  start: {results['start']['test']}, greedy {results['start']['test_greedy']}")
    results["regimes"], results["on_policy"], results["skipped"] = {}, {}, []
    for regime, method in configurations(plan):
        if time.perf_counter() - clock > plan.budget_minutes * 60:
            results["skipped"].append(f"{regime}/{method}")
            continue
        say(f"5 {regime}/{method}: lr sweep {plan.lrs}, seeds {plan.seeds}")
        data_regime = "reference" if regime == "on_policy" else regime
        entry = tune_and_repeat(plan, out, ledger, data_regime, method)
        if regime == "on_policy":
            results["on_policy"][method] = entry
        else:
            results["regimes"].setdefault(regime, {})[method] = entry
    if results["skipped"]:
        say(f"budget of {plan.budget_minutes} min spent; not run: {results['skipped']} (rerun)")
    results["curves"] = {}
    for regime, methods in results["regimes"].items():
        best = max(methods, key=lambda m: methods[m]["summary"]["accuracy"]["mean"])
        say(f"6 the learning curve of {regime}/{best}")
        results["curves"][regime] = {
            "method": best,
            "points": ledger.get(
                f"{regime}/{best}/curve",
                lambda m=methods[best]: learning_curve(
                    plan, out, m["seeds"], checkpoint_steps(plan)
                ),
            ),
        }
        results["curves"][regime]["points"][0]["accuracy"] = results["start"]["test"]["accuracy"]
    results["long"] = {}
    for regime, methods in results["regimes"].items():
        best = results["curves"][regime]["method"]
        for method in [m for m in dict.fromkeys([best, *plan.long_methods]) if m in methods]:
            say(f"7 the long run of {regime}/{method}, {plan.long_steps} steps")
            long = ledger.get(
                f"{regime}/{method}/long",
                lambda r=regime, m=method, lr=methods[method]["lr"]: long_run(plan, out, r, m, lr),
            )
            long["points"][0]["accuracy"] = results["start"]["test"]["accuracy"]
            results["long"].setdefault(regime, {})[method] = long
    results["seconds_this_session"] = round(time.perf_counter() - clock, 1)
    with staged_files([out / RESULTS]) as (file,):
        file.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--fresh", action="store_true", help="forget finished stages")
    parser.add_argument("--regimes", nargs="+", default=list(ProtocolPlan.regimes))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--on-policy", nargs="*", default=list(ON_POLICY))
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=ProtocolPlan.budget_minutes,
        help="start no new method after this long (a rerun resumes)",
    )
    args = parser.parse_args(argv)
    if args.fresh:
        (Path(args.out) / LEDGER).unlink(missing_ok=True)
    plan = ProtocolPlan(
        out=args.out,
        regimes=tuple(args.regimes),
        methods=tuple(args.methods),
        on_policy=tuple(args.on_policy),
        budget_minutes=args.budget_minutes,
    )
    results = run_protocol(plan)
    from hpd_megatron.study.report import write_protocol_report

    write_protocol_report(results, Path(args.out))


if __name__ == "__main__":
    run_cli(main)
