"""Cost of one HPD distillation step against an SFT step plus a teacher forward.

    python bench/step_bench.py --json OUT [--tp 1 2] [--repeats 7]

HPD's efficiency claim is that a step costs about one SFT step of the student plus one
forward of the teacher on the same batch. For each TP size this starts that many
gloo ranks (torchrun), builds a 4-layer/256 student and an 8-layer/512 teacher, and
times, interleaved so machine noise hits all three alike:

  hpd      a full HPD step (teacher + student forward, loss, backward, AdamW update)
  sft      an SFT step of the student alone (same batch, same optimizer)
  teacher  a forward of the teacher alone under no_grad

The reported ratio is median(hpd) / (median(sft) + median(teacher)); 1.0 means HPD's
vocabulary work is free beyond the cross-entropy an SFT step already pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

STUDENT = dict(
    family="llama",
    num_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=704,
    vocab_size=8000,
)
TEACHER = dict(STUDENT, num_layers=8, hidden_size=512, ffn_hidden_size=1408)


def run_configs(tp: int, seq_length: int, micro_batch_size: int, micro_batches: int):
    """The HPD and the SFT run of the benchmark (the same models, batch and layout)."""
    from hpd_megatron.config import from_dict
    from hpd_megatron.training.config import RunConfig

    base = {
        "student": {"model": STUDENT},
        "teacher": {"model": TEACHER},
        "data": {"seq_length": seq_length},
        "parallel": {"tensor_model_parallel_size": tp},
        "schedule": {
            "train_steps": 1000,
            "micro_batch_size": micro_batch_size,
            "global_batch_size": micro_batch_size * micro_batches,
        },
    }
    hpd_run = from_dict(RunConfig, dict(base, loss={"method": "hpd"}))
    sft_run = from_dict(RunConfig, dict(base, loss={"method": "sft"}))
    return hpd_run, sft_run


def random_batches(seq_length: int, micro_batch_size: int, micro_batches: int) -> list[dict]:
    """Seeded random micro-batches, the first quarter of each sequence a prompt."""
    import torch

    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(micro_batches):
        tokens = torch.randint(
            0, STUDENT["vocab_size"], (micro_batch_size, seq_length + 1), generator=generator
        )
        labels = tokens[:, 1:].clone()
        labels[:, : seq_length // 4] = -100  # a prompt
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": labels,
                "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1),
                "sample_index": torch.arange(micro_batch_size) + index * micro_batch_size,
            }
        )
    return batches


def time_variants(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each variant per round, interleaved; the first round is dropped."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats + 1):  # the first round warms up and is dropped
        for name, run_variant in variants.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            run_variant(repeat + 1)
            torch.distributed.barrier()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return times


def worker(
    out_path: str, repeats: int, seq_length: int, micro_batch_size: int, micro_batches: int
) -> None:
    import torch

    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.components import build_models, build_optimizer
    from hpd_megatron.training.objective import DistillationObjective
    from hpd_megatron.training.pair import DistillationPair
    from hpd_megatron.training.schedule import causal_lm_forward, run_schedule

    tp = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    hpd_run, sft_run = run_configs(tp, seq_length, micro_batch_size, micro_batches)
    student_description = ModelDescription.from_dict(STUDENT)
    teacher_description = ModelDescription.from_dict(TEACHER)
    initialize_parallel(
        ParallelLayout(tp, 1),
        seed=0,
        models=[("student", student_description), ("teacher", teacher_description)],
    )
    models = build_models(hpd_run, student_description, teacher_description)
    optimizer, _ = build_optimizer(hpd_run, models.student)
    sft_pair = DistillationPair(models.student, None, STUDENT["hidden_size"], 0)
    batches = random_batches(seq_length, micro_batch_size, micro_batches)

    def train_step(run, pair, step):
        models.student.zero_grad_buffer()
        optimizer.zero_grad()
        objective = DistillationObjective(run, student_description.vocab_size)
        forward_step = partial(objective.forward_step, step)
        run_schedule(pair, batches, forward_step, seq_length, micro_batch_size)
        optimizer.step()

    def teacher_forward(_step):
        with torch.no_grad():
            for batch in batches:
                causal_lm_forward(models.pair.teacher, batch)

    variants = {
        "hpd": lambda step: train_step(hpd_run, models.pair, step),
        "sft": lambda step: train_step(sft_run, sft_pair, step),
        "teacher": teacher_forward,
    }
    times = time_variants(variants, repeats)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(times))


def time_layout(args: argparse.Namespace, tp: int) -> dict:
    """The three variants' times at TP ``tp`` (``tp`` ranks under torchrun), their medians
    and the ratio, printed."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "times.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={tp}", str(Path(__file__).resolve())]
        command += ["--json", args.json, "--worker", str(raw), "--repeats", str(args.repeats)]
        command += ["--seq-length", str(args.seq_length)]
        command += ["--micro-batch-size", str(args.micro_batch_size)]
        command += ["--micro-batches", str(args.micro_batches)]
        subprocess.run(command, check=True, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
        times = json.loads(raw.read_text())
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["hpd"] / (medians["sft"] + medians["teacher"])
    print(
        f"TP{tp}: hpd {medians['hpd']:.3f} s, sft {medians['sft']:.3f} s, "
        f"teacher forward {medians['teacher']:.3f} s -> ratio {ratio:.3f}",
        flush=True,
    )
    return {"median_s": medians, "times_s": times, "ratio_hpd_over_sft_plus_teacher": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker, args.repeats, args.seq_length, args.micro_batch_size, args.micro_batches
        )
        return
    results = {
        "what": __doc__.split("\n\n")[1].strip(),
        "student": STUDENT,
        "teacher": TEACHER,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "micro_batches": args.micro_batches,
        "repeats": args.repeats,
        "layouts": {f"TP{tp}": time_layout(args, tp) for tp in args.tp},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
