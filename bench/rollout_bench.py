"""What rollouts cost: generate's decode loop (default), or HPD steps with rollouts (--steps).

    python bench/rollout_bench.py [--output bench/results/rollout_bench.json]   # tiny, CPU
    python bench/rollout_bench.py --shape qwen2.5-1.5b --output PATH           # one GPU
    python bench/rollout_bench.py --steps --output PATH                        # issue 19

**Decode loop** (one process, TP1 PP1, random initialisation, ``eval.generate`` with
``row_seeds`` as rollouts call it, temperature 1, no EOS so every row writes every token):

  tiny           recipes/models/tiny_student.yaml (2 x 96, vocabulary 128), fp32, 64 rows
                 x 32 prompt tokens, 32 new tokens; the CPU (or a GPU, if there is one)
  qwen2.5-1.5b   recipes/models/qwen2.5_1.5b.yaml (28 x 1536, 12 heads, 2 KV groups, ffn
                 8960, vocabulary 151,936 padded, tied embeddings), bf16, 64 rows x 512
                 prompt tokens, 256 new tokens; needs CUDA

Two variants, interleaved per round, the first round a warm-up; medians:

  batched   today's loop: every row's draw for every position in one Philox computation
            on the device, the batch's state on the device, the host looking for finished
            rows every ``CHECK_EVERY`` steps
  per_row   the loop before issue 27 (the baseline, kept here): a seeded CPU generator per
            row and position, the tokens brought to the host and bookkept in a Python loop
            over the rows at every step

Per variant: the whole generate call, the prefill (generate with one new token), decode
tokens/s = rows x (new tokens - 1) / (generate - prefill), and the loop's host time per
decode step: the same loop with the model's forward replaced by a stub that returns ready
tokens, i.e. what the loop itself costs the host per position (draws, bookkeeping, waits).

**Steps** (``--steps``): one process (TP1 PP1, the CPU or one GPU) trains the tiny models
of recipes/tiny_cpu.yaml (student 2 x 96, teacher 4 x 192, vocabulary 128) with loss.method
hpd on the arithmetic task (seq_length 96, global batch 16, micro-batch 4) through the real
trainer. Each round runs one ``train_step`` per variant, interleaved so machine noise hits
all of them alike:

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
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Megatron needs one hardware queue for its overlap; set before CUDA initialises.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FRACTIONS = {"off-policy": 0.0, "lambda 0.25": 0.25, "lambda 1": 1.0}


@dataclass(frozen=True)
class Shape:
    model: str
    """recipes/models/ file."""
    dtype: str
    rows: int
    prompt_tokens: int
    new_tokens: int
    repeats: int


SHAPES = {
    "tiny": Shape("tiny_student.yaml", "fp32", 64, 32, 32, 5),
    "qwen2.5-1.5b": Shape("qwen2.5_1.5b.yaml", "bf16", 64, 512, 256, 3),
}

# --- the decode loop -------------------------------------------------------------------


def init_single_process() -> None:
    """Megatron's parallel state at TP1 PP1 in this process, on a free port."""
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    initialize_parallel(ParallelLayout(1, 1), seed=0)


def build_model(shape: Shape):
    """A randomly initialised GPTModel of the shape, in eval mode, and its description."""
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.models.dtypes import DTYPES

    description = ModelDescription.from_yaml(ROOT / "recipes/models" / shape.model)
    config = transformer_config(description, params_dtype=DTYPES[shape.dtype])
    return build_gpt_model(description, config).eval(), description


def per_row_generate(model, prompts, settings, *, vocab_size: int, row_seeds) -> list[list[int]]:
    """The baseline: generate(row_seeds=...) as it was before issue 27, without EOS (as the
    bench uses it). Per position: a CPU generator per row seeded by sha256, the tokens to
    the host, a Python loop over the rows."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext

    from hpd_megatron.eval import generate as gen
    from hpd_megatron.parallel.placement import to_device
    from hpd_megatron.training.components import sample_seed

    lengths = [len(prompt) for prompt in prompts]
    width = max(lengths) + settings.max_new_tokens
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    replies: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    cache = StaticInferenceContext(max_batch_size=len(prompts), max_sequence_length=width)
    chunk = tokens[:, : min(lengths)]
    for position in range(min(lengths), width):
        draws = [
            torch.rand(
                1,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(sample_seed(row_seeds[row], position, 0)),
            )
            for row in active
        ]
        ids, entropies = gen._next_step(
            model,
            to_device(chunk),
            position - chunk.shape[1],
            cache,
            settings,
            vocab_size,
            0,
            to_device(torch.cat(draws)),
        )
        ids, entropies = ids.tolist(), entropies.tolist()
        kept = []
        for index, (row, token) in enumerate(zip(active, ids)):
            if position < lengths[row]:
                kept.append(index)
                continue
            replies[row].append(token)
            tokens[row, position] = token
            if len(replies[row]) < settings.max_new_tokens:
                kept.append(index)
        if not kept:
            break
        if len(kept) < len(active):
            gen._keep_rows(cache, kept)
            active = [active[index] for index in kept]
        chunk = tokens[active, position : position + 1]
    return replies


def batched_generate(model, prompts, settings, *, vocab_size: int, row_seeds) -> list[list[int]]:
    from hpd_megatron.eval.generate import generate

    generations = generate(
        model,
        prompts,
        settings,
        vocab_size=vocab_size,
        eos_id=None,
        context_length=max(map(len, prompts)) + settings.max_new_tokens,
        row_seeds=row_seeds,
    )
    return [generation.tokens for generation in generations]


VARIANTS = {"batched": batched_generate, "per_row": per_row_generate}


@contextmanager
def stubbed_forward(rows: int):
    """generate's forward step replaced by one returning ready tokens on the device: what
    remains of a generate call is the decode loop's own host work."""
    import torch

    from hpd_megatron.eval import generate as gen
    from hpd_megatron.parallel.placement import current_device

    ids = torch.ones(rows, dtype=torch.long, device=current_device())
    entropies = torch.zeros(rows, dtype=torch.float64, device=current_device())
    real = gen._next_step
    gen._next_step = lambda model, tokens, *rest: (ids[: tokens.shape[0]], entropies[: len(tokens)])
    try:
        yield
    finally:
        gen._next_step = real


def seconds(body: Callable[..., object], *args, **kwargs) -> float:
    """Wall time of ``body(*args, **kwargs)``, the device's queued work included."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin = time.perf_counter()
    body(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def time_decode(model, shape: Shape, vocab_size: int, repeats: int) -> dict[str, list[float]]:
    """Per measurement, each round's seconds; the first round (warm-up) is dropped."""
    import torch

    from hpd_megatron.eval.generate import SamplingSettings

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab_size, (shape.rows, shape.prompt_tokens), generator=generator)
    prompts = prompts.tolist()
    row_seeds = [1_000_003 * row + 7 for row in range(shape.rows)]
    full = SamplingSettings(temperature=1.0, max_new_tokens=shape.new_tokens)
    one = SamplingSettings(temperature=1.0, max_new_tokens=1)
    call = dict(vocab_size=vocab_size, row_seeds=row_seeds)
    times: dict[str, list[float]] = {}

    def record(name: str, seconds_: float, repeat: int) -> None:
        if repeat:
            times.setdefault(name, []).append(seconds_)

    for repeat in range(repeats + 1):
        record("prefill_s", seconds(batched_generate, model, prompts, one, **call), repeat)
        for name, run in VARIANTS.items():
            record(f"{name}/generate_s", seconds(run, model, prompts, full, **call), repeat)
            with stubbed_forward(shape.rows):
                loop = seconds(run, model, prompts, full, **call)
            record(f"{name}/host_step_s", loop / shape.new_tokens, repeat)
    return times


def decode_report(args: argparse.Namespace, shape: Shape, description, times: dict) -> dict:
    import torch

    median = {name: statistics.median(values) for name, values in times.items()}
    prefill = median["prefill_s"]
    decode_tokens = shape.rows * (shape.new_tokens - 1)
    variants = {
        name: {
            "generate_s": median[f"{name}/generate_s"],
            "decode_s": median[f"{name}/generate_s"] - prefill,
            "decode_tokens_per_s": decode_tokens / (median[f"{name}/generate_s"] - prefill),
            "host_step_ms": 1e3 * median[f"{name}/host_step_s"],
            "generate_s_runs": times[f"{name}/generate_s"],
            "host_step_ms_runs": [1e3 * value for value in times[f"{name}/host_step_s"]],
        }
        for name in VARIANTS
    }
    new, old = variants["batched"], variants["per_row"]
    return {
        "mode": "decode",
        "shape": args.shape,
        "machine": machine(),
        "model": {
            "file": f"recipes/models/{shape.model}",
            "num_layers": description.num_layers,
            "hidden_size": description.hidden_size,
            "vocab_size": description.vocab_size,
            "dtype": shape.dtype,
        },
        "rows": shape.rows,
        "prompt_tokens": shape.prompt_tokens,
        "new_tokens": shape.new_tokens,
        "repeats": args.repeats,
        "prefill_s": prefill,
        "decode_tokens_per_s": new["decode_tokens_per_s"],
        "host_step_ms": new["host_step_ms"],
        "baseline_decode_tokens_per_s": old["decode_tokens_per_s"],
        "baseline_host_step_ms": old["host_step_ms"],
        "decode_speedup": new["decode_tokens_per_s"] / old["decode_tokens_per_s"],
        "host_step_speedup": old["host_step_ms"] / new["host_step_ms"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "prefill_s_runs": times["prefill_s"],
        "variants": variants,
    }


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {device}, torch {torch.__version__}"


def decode_main(args: argparse.Namespace) -> int:
    import torch

    from hpd_megatron.parallel.initialize import destroy_parallel

    shape = SHAPES[args.shape]
    if args.shape != "tiny" and not torch.cuda.is_available():
        sys.exit(f"--shape {args.shape} needs CUDA; the default (tiny) runs on the CPU")
    init_single_process()
    try:
        model, description = build_model(shape)
        with torch.no_grad():
            times = time_decode(model, shape, description.vocab_size, args.repeats)
    finally:
        destroy_parallel()
    report = decode_report(args, shape, description, times)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.shape}: {shape.rows} rows x {shape.prompt_tokens} + {shape.new_tokens} tokens, "
        f"prefill {report['prefill_s']:.3f} s"
    )
    for name, row in report["variants"].items():
        print(
            f"  {name:8s} decode {row['decode_tokens_per_s']:10.1f} tokens/s  "
            f"host {row['host_step_ms']:.3f} ms/step  (generate {row['generate_s']:.3f} s)"
        )
    print(
        f"  batched / per_row: decode x{report['decode_speedup']:.2f}, "
        f"host step x{report['host_step_speedup']:.1f} less; wrote {args.output}"
    )
    return 0


# --- HPD steps with rollouts (issue 19) ----------------------------------------------------


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


def steps_main(args: argparse.Namespace) -> int:
    """The step comparison (issue 19): off-policy HPD against lambda 0.25 and 1."""
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
    write_steps_report(args, results)
    return 0


def write_steps_report(args: argparse.Namespace, results: dict) -> None:
    import torch

    baseline = statistics.median(results["off-policy"]["step_s"])
    report = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        + ("cuda" if torch.cuda.is_available() else "cpu"),
        "mode": "steps",
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
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report["variants"].items():
        print(
            f"{name:12s} step {row['median_step_s']:.3f} s  x{row['ratio_to_off_policy']:.2f} "
            f"of off-policy  rollout {row['median_rollout_s']:.3f} s ({row['rollout_share']:.0%})"
            f"  teacher {row['median_teacher_s']:.3f} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", "--json", dest="output", default=None, help="the JSON")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", action="store_true", help="HPD steps with rollouts")
    parser.add_argument("--repeats", type=int, help="timed rounds after a warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="--steps only")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(ROOT / "bench/results/rollout_bench.json")
    if args.steps:
        args.repeats = args.repeats or 5
        return steps_main(args)
    args.repeats = args.repeats or SHAPES[args.shape].repeats
    return decode_main(args)


if __name__ == "__main__":
    sys.exit(main())
