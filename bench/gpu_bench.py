"""GPU cost of an HPD step (1B student, 3B teacher) against an SFT step and a teacher forward.

    torchrun --nproc-per-node 1 bench/gpu_bench.py [--output bench/results/gpu_bench.json]
    python bench/gpu_bench.py --tiny     # the same code path on the CPU, small models

A Llama-3.2-1B-shaped student and a Llama-3.2-3B-shaped teacher (random initialisation,
vocabulary 128,256), sequences of 4096 tokens, bf16, the Transformer Engine layer spec when
installed, built by the trainer's own pieces (build_models, build_optimizer,
DistillationObjective, run_schedule). Timed interleaved in one process, medians of the
rounds after a warm-up round (bench/step_bench.py's time_variants):

  hpd      a full HPD step (teacher + student forward, loss, backward, optimizer step)
  hpd_fused  the same with loss.fused_head (no logits materialised; the same batches)
  sft      an SFT step of the student alone (same batch, same optimizer)
  teacher  a forward of the teacher alone under no_grad

For each: tokens/s per GPU, MFU (the planner's training_flops_per_token over the GPU's dense
bf16 peak; the teacher's FLOPs are the HPD step's minus the SFT step's) and peak allocated
memory (torch.cuda.max_memory_allocated, with every model and the optimizer state
resident). Then the ratio median(hpd) / (median(sft) + median(teacher)), and the last
stage's head and loss alone on one micro-batch at the models' hidden sizes: HPD fused and
unfused against the floor, Megatron-Core's vocab_parallel_cross_entropy with the student's
head and the teacher's logits (bench/loss_bench.py's variants, forward + backward).
Token ids are step_bench's seeded random batches (ids below 8000; the cost does not depend
on which ids they are).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import loss_bench  # noqa: E402
import step_bench  # noqa: E402

# Llama 3.2 1B and 3B shapes: 1.24 B and 3.21 B parameters.
STUDENT = dict(
    family="llama",
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=8192,
    vocab_size=128256,
    max_position_embeddings=4096,
    rotary_base=500000.0,
    tie_word_embeddings=True,
)
TEACHER = dict(STUDENT, num_layers=28, hidden_size=3072, num_attention_heads=24)
FULL = dict(
    student=STUDENT,
    teacher=TEACHER,
    seq_length=4096,
    micro_batch_size=1,
    micro_batches=4,
    repeats=5,
)
# --tiny: step_bench's CPU models, short sequences, few rounds; a check that the code runs.
TINY = dict(
    student=step_bench.STUDENT,
    teacher=step_bench.TEACHER,
    seq_length=256,
    micro_batch_size=2,
    micro_batches=2,
    repeats=2,
)
VARIANTS = ("hpd", "hpd_fused", "sft", "teacher")


def run_configs(shapes: dict, micro_batches: int, params_dtype: str):
    """The HPD and the SFT run of the benchmark (the same models and batch, TP1)."""
    from hpd_megatron.config import from_dict
    from hpd_megatron.training.config import RunConfig

    base = {
        "student": {"model": shapes["student"]},
        "teacher": {"model": shapes["teacher"]},
        "data": {"seq_length": shapes["seq_length"]},
        "params_dtype": params_dtype,
        "schedule": {
            "train_steps": 1000,
            "micro_batch_size": shapes["micro_batch_size"],
            "global_batch_size": shapes["micro_batch_size"] * micro_batches,
        },
    }
    return (
        from_dict(RunConfig, dict(base, loss={"method": "hpd"})),
        from_dict(RunConfig, dict(base, loss={"method": "hpd", "fused_head": True})),
        from_dict(RunConfig, dict(base, loss={"method": "sft"})),
    )


def initialize(shapes: dict):
    """Megatron's parallel state at TP1 PP1: torchrun's process group, or a 1-rank one."""
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    if "RANK" in os.environ:
        initialize_parallel(ParallelLayout(1, 1), seed=0)
    else:
        loss_bench._init_parallel()  # a free port, rank 0 of 1
    return (
        ModelDescription.from_dict(shapes["student"]),
        ModelDescription.from_dict(shapes["teacher"]),
    )


def step_variants(runs, models, optimizer, batches, peaks: dict) -> dict:
    """name -> callable(step) for step_bench.time_variants; each records its peak memory."""
    from hpd_megatron.training.objective import DistillationObjective
    from hpd_megatron.training.pair import DistillationPair
    from hpd_megatron.training.schedule import batch_to_device, causal_lm_forward, run_schedule

    hpd_run, fused_run, sft_run = runs
    seq, mbs = hpd_run.data.seq_length, hpd_run.schedule.micro_batch_size
    vocab = models.student_description.vocab_size
    hidden = models.student_description.hidden_size
    sft_pair = DistillationPair(models.student, None, hidden, 0)
    teacher_hidden = models.teacher_description.hidden_size
    fused_pair = DistillationPair(
        models.student, models.pair.teacher, hidden, teacher_hidden, True, vocab
    )

    def train_step(run, pair, step):
        # As DistillationTrainer.train_step, without the metrics and the LR schedule.
        models.student.zero_grad_buffer()
        optimizer.zero_grad()
        forward_step = partial(DistillationObjective(run, vocab).forward_step, step)
        run_schedule(pair, batches, forward_step, seq, mbs, adjust_tensor_shapes_fn=None)
        optimizer.step()

    def teacher_forward(_step):
        with torch.no_grad():
            for batch in batches:
                causal_lm_forward(models.pair.teacher, batch_to_device(batch))

    def measured(name, body):
        def run(step):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            body(step)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the time covers the GPU's work
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())

        return run

    return {
        "hpd": measured("hpd", lambda step: train_step(hpd_run, models.pair, step)),
        "hpd_fused": measured("hpd_fused", lambda step: train_step(fused_run, fused_pair, step)),
        "sft": measured("sft", lambda step: train_step(sft_run, sft_pair, step)),
        "teacher": measured("teacher", teacher_forward),
    }


def flops_per_token(student, teacher, seq: int) -> dict[str, float]:
    """The planner's FLOPs per token of each variant (TP1)."""
    from hpd_megatron.plan import training_flops_per_token

    hpd = training_flops_per_token(student, teacher, seq)
    sft = training_flops_per_token(student, None, seq)
    return {"hpd": hpd, "hpd_fused": hpd, "sft": sft, "teacher": hpd - sft}


def step_results(times: dict, peaks: dict, flops: dict, tokens_per_rank: int) -> dict:
    """Medians, tokens/s/GPU, MFU, peak memory and the HPD ratio of the timed steps."""
    from hpd_megatron.training.metrics import _peak_flops_per_device

    peak_flops = _peak_flops_per_device()
    medians = {name: statistics.median(values) for name, values in times.items()}
    rates = {name: tokens_per_rank / medians[name] for name in VARIANTS}
    return {
        "median_s": medians,
        "times_s": times,
        "tokens_per_s_per_gpu": rates,
        "flops_per_token": flops,
        "peak_bf16_flops": peak_flops,
        "mfu": {name: rates[name] * flops[name] / peak_flops for name in VARIANTS}
        if peak_flops
        else None,
        "peak_memory_gib": {name: peaks[name] / 2**30 for name in VARIANTS} if peaks else None,
        "ratio_hpd_over_sft_plus_teacher": medians["hpd"] / (medians["sft"] + medians["teacher"]),
        "ratio_fused_over_hpd": medians["hpd_fused"] / medians["hpd"],
    }


def loss_kernel(shapes: dict, vocab: int, dtype: torch.dtype, device, reps: int) -> dict:
    """The last stage's head and HPD loss of one micro-batch at the bench's hidden sizes,
    fused and unfused, against the floor (bench/loss_bench.py's variants)."""
    tokens = shapes["seq_length"] * shapes["micro_batch_size"]
    hidden = shapes["student"]["hidden_size"], shapes["teacher"]["hidden_size"]
    table = loss_bench.variants(["hpd"], None)
    inputs = loss_bench.make_inputs(tokens, vocab, *hidden, dtype, device)
    samples = loss_bench.run_timings(inputs, device, table, reps)
    del inputs
    medians = {name: statistics.median(s["seconds"]) for name, s in samples.items()}
    return {
        "tokens": tokens,
        "vocab": vocab,
        "hidden": list(hidden),
        "dtype": str(dtype).removeprefix("torch."),
        "median_s": medians,
        "seconds": {name: s["seconds"] for name, s in samples.items()},
        "fused_over_unfused": medians["fused:hpd"] / medians["unfused:hpd"],
        "fused_over_floor": medians["fused:hpd"] / medians["floor"],
        # On the CPU loss_bench measures memory in a child process; here only on the GPU.
        "extra_MiB": {
            name: statistics.median(s["extra_bytes"]) / 2**20 for name, s in samples.items()
        }
        if device.type == "cuda"
        else None,
    }


def machine(device: torch.device) -> dict:
    from hpd_megatron.models.builder import transformer_engine_available

    return {
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": torch.distributed.get_world_size(),
        "torch": torch.__version__,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
        "layer_spec": "transformer_engine" if transformer_engine_available() else "local",
    }


def summary(results: dict) -> str:
    steps = results["steps"]
    lines = []
    for name in VARIANTS:
        mfu = f", MFU {100 * steps['mfu'][name]:.1f}%" if steps["mfu"] else ""
        memory = (
            f", peak {steps['peak_memory_gib'][name]:.1f} GiB" if steps["peak_memory_gib"] else ""
        )
        lines.append(
            f"{name:8} {steps['median_s'][name]:.3f} s, "
            f"{steps['tokens_per_s_per_gpu'][name]:.4g} tok/s/GPU{mfu}{memory}"
        )
    kernel = results["loss_kernel"]
    lines.append(
        f"hpd / (sft + teacher) = {steps['ratio_hpd_over_sft_plus_teacher']:.3f}; "
        f"hpd_fused / hpd = {steps['ratio_fused_over_hpd']:.3f}; head and loss "
        f"{kernel['tokens']}x{kernel['vocab']} {kernel['dtype']}: fused / unfused "
        f"{kernel['fused_over_unfused']:.2f}, fused / floor {kernel['fused_over_floor']:.2f}"
    )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every measurement; the results on every rank."""
    from hpd_megatron.models.builder import padded_vocab_size
    from hpd_megatron.plan import count_parameters
    from hpd_megatron.training.components import build_models, build_optimizer

    shapes = TINY if args.tiny else FULL
    student, teacher = initialize(shapes)  # selects this rank's GPU
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # bf16 is what the GPU runs; fp32 keeps the CPU check quick.
    params_dtype = "bf16" if cuda else "fp32"
    seq, mbs = shapes["seq_length"], shapes["micro_batch_size"]
    runs = run_configs(shapes, args.micro_batches, params_dtype)
    hpd_run = runs[0]
    models = build_models(hpd_run, student, teacher)
    optimizer, _ = build_optimizer(hpd_run, models.student)
    models.pair.train()
    # On the host, as the trainer's feed gives them: run_schedule moves each micro-batch.
    batches = step_bench.random_batches(seq, mbs, args.micro_batches)
    peaks: dict[str, int] = {}
    variants = step_variants(runs, models, optimizer, batches, peaks)
    times = step_bench.time_variants(variants, args.repeats)
    flops = flops_per_token(student, teacher, seq)
    vocab = padded_vocab_size(student.vocab_size, 1)
    logits_dtype = torch.bfloat16 if cuda else torch.float32
    return {
        "what": __doc__.split("\n\n", 2)[2].strip(),
        "machine": machine(device),
        "student": shapes["student"],
        "teacher": shapes["teacher"],
        "parameters": {
            "student": count_parameters(student, vocab).total,
            "teacher": count_parameters(teacher, vocab).total,
        },
        "settings": {
            "tiny": args.tiny,
            "seq_length": seq,
            "micro_batch_size": mbs,
            "micro_batches": args.micro_batches,
            "repeats": args.repeats,
            "params_dtype": params_dtype,
            "teacher_dtype": str(models.performance.teacher.params_dtype).removeprefix("torch."),
        },
        "steps": step_results(times, peaks, flops, seq * mbs * args.micro_batches),
        "loss_kernel": loss_kernel(shapes, vocab, logits_dtype, device, args.repeats),
    }


def main(argv: list[str] | None = None) -> None:
    from hpd_megatron.parallel.initialize import use_one_cuda_connection

    use_one_cuda_connection()  # first: the CUDA context must see it when it is created
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="the JSON results")
    parser.add_argument("--tiny", action="store_true", help="small models: a CPU check")
    parser.add_argument("--repeats", type=int, help="timed rounds after a warm-up (5; --tiny 2)")
    parser.add_argument("--micro-batches", type=int, help="micro-batches per step (4; --tiny 2)")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else FULL
    args.repeats = args.repeats or shapes["repeats"]
    args.micro_batches = args.micro_batches or shapes["micro_batches"]
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs CUDA (a 1B + 3B model pair at 4096 tokens); --tiny runs on the CPU")
    if args.output is None:
        args.output = BENCH / "results" / ("gpu_bench_tiny.json" if args.tiny else "gpu_bench.json")
    from hpd_megatron.parallel.initialize import destroy_parallel

    try:
        results = run_benchmark(args)
    finally:
        destroy_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(results), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
