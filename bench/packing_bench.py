"""Supervised tokens per second of HPD training steps, packed against padded samples.

    python bench/packing_bench.py [--json bench/results/packing_bench.json] [--repeats 7]

Two datasets, both at the tiny models' size (recipes/models/tiny_*.yaml, one CPU rank):

  demo         the demo's arithmetic data (hpd_megatron/demo.py's task and seq_length)
  long_traces  synthetic records with the shape of R1 math traces (``long_trace_lengths``:
               the docs/data.md distribution scaled from 10,240 down to the tiny models'
               256 positions), random tokens, the first tenth of each record a prompt

For each dataset the same student and teacher run full HPD steps (forward, loss, backward,
AdamW) on global batches from the padded and from the packed samples, interleaved so that
machine noise hits both alike; the first round is a warm-up. Throughput is the step's
supervised tokens over its wall time; the table reports medians and packed / padded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ROOT / "recipes" / "models" / "tiny_student.yaml"
TEACHER = ROOT / "recipes" / "models" / "tiny_teacher.yaml"
# The demo's models: the same shapes with its tokenizer's smaller vocabulary.
DEMO_MODELS = (
    ROOT / "recipes" / "models" / "study_student.yaml",
    ROOT / "recipes" / "models" / "study_teacher.yaml",
)
LONG_SEQ = 256  # the tiny models' max_position_embeddings
LONG_RECORDS = 800
GLOBAL_BATCH, MICRO_BATCH = 8, 2


def long_trace_lengths(count: int, seq_length: int, seed: int = 0) -> numpy.ndarray:
    """Tokens per record shaped like R1 math traces (prompt and reply), scaled to
    ``seq_length``.

    At seq_length 10,240 (docs/data.md): a log-normal with median 2,500 tokens and sigma
    0.55, clipped to [300, 8,192]: mean about 2,900, 90th percentile about 5,000, 2% of the
    records at 8k."""
    scale = seq_length / 10240
    rng = numpy.random.default_rng(seed)
    lengths = rng.lognormal(numpy.log(2500 * scale), 0.55, count)
    return numpy.clip(lengths, 300 * scale, 8192 * scale).astype(numpy.int64)


def write_long_traces(prefix: str, vocab_size: int) -> None:
    """Synthetic records in the prepared format: token and loss-mask datasets, sidecar."""
    from hpd_megatron.data.prepare import LOSS_MASK_SUFFIX, TOKENS_SUFFIX, Tally, write_datasets

    rng = numpy.random.default_rng(1)
    records = []
    for length in long_trace_lengths(LONG_RECORDS, LONG_SEQ).tolist():
        ids = rng.integers(4, vocab_size, length).tolist()
        prompt = max(1, length // 10)
        records.append((ids, [0] * prompt + [1] * (length - prompt)))
    paths = [
        Path(prefix + s + e) for s in (TOKENS_SUFFIX, LOSS_MASK_SUFFIX) for e in (".bin", ".idx")
    ]
    write_datasets(records, paths, vocab_size, Tally())
    tokenizer = {"vocab_size": vocab_size, "pad_id": 0, "eos_id": 2}
    sidecar = {"seq_length": LONG_SEQ, "tokenizer": tokenizer}
    Path(prefix + ".json").write_text(json.dumps(sidecar))


def write_demo(root: Path) -> tuple[str, int]:
    """The demo's training data (its task, problem count and seq_length)."""
    from hpd_megatron import demo
    from hpd_megatron.data import prepare
    from hpd_megatron.data.arithmetic import write_task
    from hpd_megatron.models.description import ModelDescription

    vocab = ModelDescription.from_yaml(DEMO_MODELS[0]).vocab_size
    write_task(
        root,
        num_train=demo.TRAIN_PROBLEMS,
        num_test=8,
        seed=0,
        tokenizer_vocab_size=vocab,
        **demo.TASK,
    )
    prefix = str(root / "train")
    prepare(root / "train.jsonl", root / "tokenizer.model", prefix, demo.SEQ_LENGTH, log=print)
    return prefix, demo.SEQ_LENGTH


def stepper(seq_length: int, student_yaml: Path, teacher_yaml: Path):
    """Models, optimizer and a function running one HPD step on given micro-batches."""
    from hpd_megatron.config import from_dict
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.training.components import build_models, build_optimizer
    from hpd_megatron.training.config import RunConfig
    from hpd_megatron.training.objective import DistillationObjective
    from hpd_megatron.training.schedule import run_schedule

    student = ModelDescription.from_yaml(student_yaml)
    teacher = ModelDescription.from_yaml(teacher_yaml)
    run = from_dict(
        RunConfig,
        {
            "student": {"model": str(student_yaml)},
            "teacher": {"model": str(teacher_yaml)},
            "data": {"seq_length": seq_length},
            "loss": {"method": "hpd"},
            "schedule": {
                "train_steps": 1000,
                "global_batch_size": GLOBAL_BATCH,
                "micro_batch_size": MICRO_BATCH,
            },
        },
    )
    models = build_models(run, student, teacher)
    optimizer, _ = build_optimizer(run, models.student)
    objective = DistillationObjective(run, student.vocab_size)

    def step(number: int, micro_batches: list[dict]) -> None:
        models.student.zero_grad_buffer()
        optimizer.zero_grad()
        forward_step = partial(objective.forward_step, number)
        run_schedule(models.pair, micro_batches, forward_step, seq_length, MICRO_BATCH)
        optimizer.step()

    return step


def measure(prefix: str, seq_length: int, models: tuple[Path, Path], repeats: int) -> dict:
    """Tokens per second of padded and packed steps, interleaved; medians and the ratio."""
    import torch

    from hpd_megatron.data import DistillationDataset, DistributedBatchSampler

    step = stepper(seq_length, *models)
    modes = {}
    for name, pack in (("padded", False), ("packed", True)):
        dataset = DistillationDataset(prefix, seq_length, pack=pack)
        sampler = DistributedBatchSampler(len(dataset), GLOBAL_BATCH, MICRO_BATCH, 0, 1, seed=0)
        modes[name] = (dataset, iter(sampler))
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for round_number in range(repeats + 1):  # round 0 warms up
        for name, (dataset, steps) in modes.items():
            micro_batches = []
            for indices in next(steps):
                batch = dataset.batch(indices)
                batch["sample_index"] = torch.tensor(indices)
                micro_batches.append(batch)
            tokens = sum(float(b["loss_mask"].sum()) for b in micro_batches)
            start = time.perf_counter()
            step(round_number + 1, micro_batches)
            if round_number:
                rates[name].append(tokens / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "seq_length": seq_length,
        "records": int(len(modes["padded"][0])),
        "efficiency": {name: round(dataset.efficiency, 4) for name, (dataset, _) in modes.items()},
        "samples": {name: len(dataset) for name, (dataset, _) in modes.items()},
        "supervised_tokens_per_s": rates,
        "median_supervised_tokens_per_s": medians,
        "packed_over_padded": medians["packed"] / medians["padded"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "supervised_tokens_per_s"}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "packing_bench.json"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch

    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    with socket.socket() as probe:  # a free port for the one-rank process group
        probe.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    torch.set_num_threads(os.cpu_count() or 1)
    initialize_parallel(ParallelLayout(1, 1), seed=0, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        demo_prefix, demo_seq = write_demo(Path(scratch) / "demo")
        long_prefix = str(Path(scratch) / "long_traces")
        write_long_traces(long_prefix, vocab_size=128)
        results = {
            "what": __doc__.split("\n\n")[1].strip(),
            "machine": "2-core x86_64 CPU, no GPU",
            "global_batch_size": GLOBAL_BATCH,
            "micro_batch_size": MICRO_BATCH,
            "repeats": args.repeats,
            "datasets": {
                "demo": measure(demo_prefix, demo_seq, DEMO_MODELS, args.repeats),
                "long_traces": measure(long_prefix, LONG_SEQ, (STUDENT, TEACHER), args.repeats),
            },
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
