"""``make gpu-check``: the first GPU session's checks, one command, one JSON and one summary.

On a GPU node (inside the container), within about 9 minutes on one GPU:

1. ``make test-gpu`` (the trainer end to end with Transformer Engine, bf16 resume, the
   converter's ``--verify``; with two GPUs or more also TP2 and PP2 against TP1);
2. ``bench/gpu_bench.py``: HPD step, SFT step and teacher forward, MFU, peak memory;
3. ``bench/rollout_bench.py --shape qwen2.5-1.5b``: the decode loop's tokens/s;
4. ``bench/fp8_teacher_check.py``: the teacher's cross-entropy in bf16 against FP8;
5. the converter's ``--verify`` in bf16 on a Qwen2.5-0.5B-shaped Hugging Face model
   (random weights, built from its config by transformers).

Each step runs as its own process with a time limit; a failed step is recorded and the
next one runs. ``--dry-run`` (``make gpu-check DRY_RUN=1``, in ``make test``) runs every
step's code with tiny shapes on the CPU: the GPU tests are only collected there.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
BUDGET_S = 540  # the whole check within 9 minutes on one GPU

# Qwen2.5-0.5B's architecture (its config.json), with random weights.
QWEN_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
QWEN_TINY = dict(QWEN_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=512)  # fmt: skip


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    result_file: Path | None = None
    status: str = "not run"
    seconds: float = 0.0
    output_tail: str = ""
    results: dict = field(default_factory=dict)


def hf_model(directory: Path, tiny: bool) -> Path:
    """A bf16 Qwen2 model from a config (no download), saved as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**(QWEN_TINY if tiny else QWEN_05B)))
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    return directory


def plan_steps(out: Path, dry_run: bool) -> list[Step]:
    work = out / "gpu_check_work"
    if dry_run:  # tiny shapes, one timed round each: the code runs, nothing is measured
        test_gpu = [PYTHON, "-m", "pytest", "-q", "--collect-only", "tests/gpu"]
        rollout = [PYTHON, "bench/rollout_bench.py", "--repeats", "1"]
        bench, fp8 = ["--tiny", "--repeats", "1"], ["--tiny"]
    else:
        test_gpu = ["make", "test-gpu"]
        rollout = [PYTHON, "bench/rollout_bench.py", "--shape", "qwen2.5-1.5b"]
        bench, fp8 = [], []
    gpu_bench = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    gpu_bench += ["bench/gpu_bench.py", *bench]
    convert = [PYTHON, "tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf")]
    convert += ["--out", str(work / "megatron"), "--dtype", "bf16", "--verify", "--no-progress"]
    return [
        Step("test-gpu", test_gpu, 300),
        Step("gpu_bench", gpu_bench + ["--output", str(work / "gpu_bench.json")], 240,
             work / "gpu_bench.json"),
        Step("rollout_bench", rollout + ["--output", str(work / "rollout.json")], 180,
             work / "rollout.json"),
        Step("fp8_teacher", [PYTHON, "bench/fp8_teacher_check.py", *fp8, "--output",
             str(work / "fp8_teacher.json")], 180, work / "fp8_teacher.json"),
        Step("convert_verify_bf16", convert, 240, work / "megatron" / "verify.json"),
    ]  # fmt: skip


def run_step(step: Step, deadline: float) -> None:
    timeout = max(1, min(step.timeout_s, int(deadline - time.monotonic())))
    start = time.monotonic()
    try:
        done = subprocess.run(
            step.command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        step.status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        step.status = f"timed out after {timeout} s"
        output = (expired.stdout or b"").decode(errors="replace")
    step.seconds = round(time.monotonic() - start, 1)
    step.output_tail = output[-4000:]
    if step.result_file is not None and step.result_file.is_file():
        step.results = json.loads(step.result_file.read_text())


def environment() -> dict:
    import torch

    from hpd_megatron.models.builder import transformer_engine_import

    version, problem = transformer_engine_import() if torch.cuda.is_available() else (None, "")
    return {
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "transformer_engine": version or problem,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }


def headline(name: str, results: dict) -> str:
    """The step's numbers a reader looks for first."""
    if name == "gpu_bench" and results:
        steps = results["steps"]
        mfu = steps.get("mfu") or {}
        mfu = mfu if isinstance(mfu, dict) else {"hpd": mfu}
        return (
            f"HPD {steps['tokens_per_s_per_gpu']['hpd']:.0f} tok/s/GPU, MFU "
            f"{100 * mfu['hpd']:.1f} %"
            if mfu
            else f"HPD {steps['tokens_per_s_per_gpu']['hpd']:.0f} tok/s (no MFU on this device)"
        ) + f"; HPD / (SFT + teacher) {steps['ratio_hpd_over_sft_plus_teacher']:.2f}"
    if name == "rollout_bench" and results:
        return (
            f"decode {results['decode_tokens_per_s']:.0f} tok/s, host "
            f"{results['host_step_ms']:.2f} ms/step (per-row draws: "
            f"{results['baseline_host_step_ms']:.2f})"
        )
    if name == "fp8_teacher" and results:
        return (
            f"cross-entropy bf16 {results['cross_entropy_bf16']:.4f}, fp8 "
            f"{results['cross_entropy_fp8']:.4f} ({100 * results['relative_difference']:.2f} %)"
        )
    if name == "convert_verify_bf16" and results:
        return (
            f"top-1 agreement {results['top1_agreement']:.3f}, max logit difference "
            f"{results['max_abs_logit_diff']:.3g}, mean KL {results['mean_kl']:.2g}"
        )
    return ""


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check{' (dry run on the CPU)' if report['dry_run'] else ''}",
        "",
        f"GPUs: {', '.join(env['gpus']) or 'none'}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"Transformer Engine {env['transformer_engine'] or 'n/a'}; commit {env['commit']}.",
        "",
        "| step | status | seconds | numbers |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['name']} | {s['status']} | {s['seconds']} | {headline(s['name'], s['results'])} |"
        for s in report["steps"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    import torch

    from hpd_megatron.parallel.initialize import use_one_cuda_connection

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs CUDA (a GPU node, in the container); --dry-run runs on the CPU")
    use_one_cuda_connection()  # the steps inherit it
    work = args.out / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    hf_model(work / "hf", tiny=args.dry_run)
    deadline = time.monotonic() + BUDGET_S
    steps = plan_steps(args.out, args.dry_run)
    for step in steps:
        run_step(step, deadline)
        print(f"gpu-check: {step.name}: {step.status} ({step.seconds} s)", flush=True)
    report = {
        "dry_run": args.dry_run,
        "environment": environment(),
        "steps": [
            {**asdict(s), "command": " ".join(s.command), "result_file": None} for s in steps
        ],
    }
    name = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(f"wrote {args.out / name}.json and .md", flush=True)
    return 0 if all(s.status == "passed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
