"""The FP8 teacher against the bf16 teacher: cross-entropy of the same weights on one batch.

Builds the teacher twice with the trainer's own pieces (``training.components``), bf16 and
``performance.teacher_precision=fp8``, loads the same random weights into both, and computes
each one's token-mean cross-entropy on the same batch, over several micro-batches as a step
runs them (``set_is_first_microbatch`` before the first, as the pair does). On a GPU with
Transformer Engine the FP8 one computes its linears in E4M3; ``--tiny`` runs the same code
on the CPU, where both compute in bf16 (a check that the code runs, not a measurement).

    python bench/fp8_teacher_check.py [--tiny] [--recipe tensorwise|delayed] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402

# gpu_bench's shapes: the Llama-3.2-1B student at 4096 tokens on a GPU; step_bench's on the CPU.
FULL = dict(model=gpu_bench.STUDENT, seq_length=4096, micro_batches=4)
TINY = dict(model=gpu_bench.TINY["student"], seq_length=64, micro_batches=2)
MAX_RELATIVE_DIFFERENCE = 0.02
"""FP8 (E4M3) linears move a teacher's cross-entropy by well under 1 % at these shapes; 2 %
flags a broken cast (for instance one stuck at scale 1) rather than FP8's rounding."""


def _teacher(run, description, precision: str) -> torch.nn.Module:
    from hpd_megatron.training.components import build_model
    from hpd_megatron.training.performance import resolve_performance

    run.performance.teacher_precision = precision
    settings = resolve_performance(run, 1).teacher
    return build_model(description, settings, packed=False).eval()


def _cross_entropy(model: torch.nn.Module, batches: list[torch.Tensor], vocab: int) -> float:
    """Token-mean cross-entropy over the micro-batches, the weights recast at the first."""
    total, count = 0.0, 0
    model.set_is_first_microbatch()
    with torch.no_grad():
        for tokens in batches:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            logits = model(tokens[:, :-1], positions[:, :-1], None)[..., :vocab].float()
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
            total, count = total + loss.item(), count + tokens[:, 1:].numel()
    return total / count


def check(tiny: bool, recipe: str) -> dict:
    from hpd_megatron.config import from_dict
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.config import RunConfig

    shapes = TINY if tiny else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    initialize_parallel(ParallelLayout(1, 1), seed=1, device=device)
    description = ModelDescription.from_dict(shapes["model"])
    run = from_dict(
        RunConfig,
        {
            "student": {"model": shapes["model"]},
            "teacher": {"model": shapes["model"]},
            "params_dtype": "bf16",
            "data": {"seq_length": shapes["seq_length"]},
            "schedule": {"micro_batch_size": 1},
            "performance": {"teacher_fp8_recipe": recipe},
        },
    )
    bf16 = _teacher(run, description, "bf16")
    fp8 = _teacher(run, description, "fp8" if device == "cuda" else "bf16")
    fp8.load_state_dict(bf16.state_dict())
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(
            0, description.vocab_size, (1, shapes["seq_length"] + 1), generator=generator
        ).to(device)
        for _ in range(shapes["micro_batches"])
    ]
    reference = _cross_entropy(bf16, batches, description.vocab_size)
    # Twice: a delayed-scaling cast is right only from the second pass (the trainer warms up).
    first = _cross_entropy(fp8, batches, description.vocab_size)
    second = _cross_entropy(fp8, batches, description.vocab_size)
    difference = abs(second - reference) / reference
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "fp8": device == "cuda",
        "recipe": recipe,
        "shape": "tiny" if tiny else "llama-3.2-1b",
        "tokens": shapes["seq_length"] * shapes["micro_batches"],
        "cross_entropy_bf16": reference,
        "cross_entropy_fp8_first_pass": first,
        "cross_entropy_fp8": second,
        "relative_difference": difference,
        "passed": difference <= MAX_RELATIVE_DIFFERENCE,
    }


def main(argv: list[str] | None = None) -> int:
    from hpd_megatron.parallel.initialize import destroy_parallel, use_one_cuda_connection

    use_one_cuda_connection()  # before anything touches CUDA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model: a CPU check")
    parser.add_argument("--recipe", choices=("tensorwise", "delayed"), default="tensorwise")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "fp8_teacher.json")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs CUDA with Transformer Engine; --tiny runs the code on the CPU")
    try:
        result = check(args.tiny, args.recipe)
    finally:
        destroy_parallel()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"teacher cross-entropy bf16 {result['cross_entropy_bf16']:.4f}, fp8 "
        f"{result['cross_entropy_fp8']:.4f} ({100 * result['relative_difference']:.2f} %): "
        f"{'passed' if result['passed'] else 'FAILED'}; wrote {args.output}",
        flush=True,
    )
    return 0 if result["passed"] else 2


if __name__ == "__main__":
    sys.exit(main())
