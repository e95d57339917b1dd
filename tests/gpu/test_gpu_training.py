"""On CUDA: the trainer end to end with the Transformer Engine spec in bf16, HPD with a teacher.

Skipped without CUDA (`make test-gpu` fails instead when the node shows GPUs torch cannot
use). Built like the CPU trainer tests (tests/conftest.py's ``setup``: the arithmetic task,
initial weights saved once, the tiny student and teacher), launched as users launch it:
``torchrun -m hpd_megatron.train --config RECIPE key=value...``. On one GPU: HPD at TP1
(saving), a student that learns, the bf16 resume without optimizer state, the converter's
--verify. With two GPUs or more: also HPD at TP2 and PP2, whose first step must match
TP1's; with four, the resume runs at TP2 PP2 as on the CPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multiprocess import run_on_ranks
from tests.test_checkpoints import TP2_PP2
from tests.test_convert import BF16, _make_hf_model
from tests.tool_runs import TOOLS
from tests.training_runs import (
    STEPS,
    assert_resume_kept_the_loaded_weights,
    resume_without_optimizer_state,
    train_on_rank,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
BF16_CUDA = ["params_dtype=bf16", "device=cuda"]
LAYOUTS = {
    "TP1": (1, ["checkpoint.save_interval=3"]),  # also saves with the plain bf16 optimizer
    "TP2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "PP2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    # The fused head in bf16 (the GEMM in bf16, apex's fp32 weight-gradient accumulation
    # when apex has it) and, at TP2, with sequence parallelism (TE's default there).
    "TP1 fused head": (1, ["loss.fused_head=true"]),
    "TP2 fused head": (2, ["parallel.tensor_model_parallel_size=2", "loss.fused_head=true"]),
}
# The same weights and data in bf16: the layouts sum in different orders, so the first
# losses agree to bf16's precision, not bit for bit. HPD's loss is a small difference of
# per-token terms of order one, hence the absolute part.
BF16_TOLERANCE = dict(rel=2e-2, abs=3e-3)
TIMEOUT_S = 300


def _torchrun_train(recipe: str, gpus: int, overrides: list[str]) -> str:
    """``torchrun -m hpd_megatron.train`` on ``gpus`` GPUs; its stdout (fails with its output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={gpus}", "-m", "hpd_megatron.train", "--config", recipe]
    done = subprocess.run(
        command + overrides, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if done.returncode:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-6000:]}")
    return done.stdout


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, dict]:
    """HPD at each layout this machine has the GPUs for: its run directory, start-up output
    and metrics."""
    out = {}
    for name, (gpus, overrides) in LAYOUTS.items():
        if gpus > GPUS:
            continue
        run_dir = setup["root"] / f"gpu_{name.replace(' ', '_')}"
        stdout = _torchrun_train(
            setup["recipe"], gpus, BF16_CUDA + overrides + [f"run_dir={run_dir}"]
        )
        out[name] = {"run_dir": run_dir, "stdout": stdout, "metrics": _metrics(run_dir)}
    return out


def test_hpd_runs_with_transformer_engine_in_bf16_on_one_gpu(runs):
    run = runs["TP1"]
    # The start-up line: NCCL on the GPU, the TE spec (required on CUDA), a bf16 student.
    startup = "backend nccl, device cuda, layer spec transformer_engine"
    assert startup in run["stdout"] and "student bf16" in run["stdout"], run["stdout"]
    metrics = run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert all(m["skipped_steps"] == 0 for m in metrics), metrics
    assert 0 < metrics[-1]["peak_memory_gb"] < 1, "tiny models: GPU memory, not host memory"
    tracker = run["run_dir"] / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text() == f"{STEPS}\n"


@pytest.mark.parametrize("layout", ["TP2", "PP2", "TP1 fused head", "TP2 fused head"])
def test_first_step_of_each_layout_matches_tp1(runs, layout):
    if layout not in runs:
        pytest.skip(f"{layout} needs {LAYOUTS[layout][0]} GPUs; this machine has {GPUS}")
    reference, other = runs["TP1"]["metrics"], runs[layout]["metrics"]
    assert [m["step"] for m in other] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in other), other
    for key in ("loss", "cross_entropy", "grad_norm"):
        assert other[0][key] == pytest.approx(reference[0][key], **BF16_TOLERANCE), key
    assert other[0]["supervised_tokens"] == reference[0]["supervised_tokens"]


def test_student_learns_on_one_gpu(setup):
    """The tests' teacher is a random initialisation (near uniform), so a distillation loss
    toward it moves by noise in a few steps; the student's cross-entropy on the arithmetic
    task (SFT, the same trainer path) falls clearly: 4.87 to 2.79 in 12 steps on the CPU in
    bf16."""
    run_dir = setup["root"] / "gpu_learn"
    overrides = ["schedule.train_steps=12", "optimizer.lr=1.0e-2", "loss.method=sft"]
    _torchrun_train(setup["recipe"], 1, BF16_CUDA + overrides + [f"run_dir={run_dir}"])
    losses = [m["loss"] for m in _metrics(run_dir)]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_bf16_resume_without_optimizer_state_keeps_the_loaded_weights(setup):
    """As tests/test_checkpoints.py's test of the same name, on the GPU (TP2 PP2 with four
    GPUs, TP1 otherwise), with the distributed optimizer (the plain one saves in the TP1 HPD
    run above): the fresh optimizer's fp32 main weights come from the checkpoint."""
    ranks, layout = (4, TP2_PP2) if GPUS >= 4 else (1, [])
    lr = 0.02
    run = layout + BF16_CUDA
    run += [
        "optimizer.use_distributed_optimizer=true",
        f"optimizer.lr={lr}",
        "schedule.warmup_steps=0",
        "schedule.decay_style=constant",
        f"run_dir={setup['root'] / 'gpu_bf16_no_optimizer_state'}",
        "schedule.train_steps=5",
    ]
    # Four steps, saved; then the last step resumes with a fresh optimizer.
    run_on_ranks(
        train_on_rank, ranks, setup["recipe"], run + ["schedule.exit_interval=4"], timeout=TIMEOUT_S
    )
    results = run_on_ranks(
        resume_without_optimizer_state,
        ranks,
        setup["recipe"],
        run + ["checkpoint.load_optimizer=false"],
        timeout=TIMEOUT_S,
    )
    assert_resume_kept_the_loaded_weights(results, lr)


def test_converter_verify_on_the_gpu_in_bf16(tmp_path):
    """tools/convert_hf_to_megatron.py --dtype bf16 --verify, as a user runs it on a GPU node:
    a bf16 Hugging Face model (tests/test_convert.py's), its logits compared on the GPU."""
    hf_dir, out = tmp_path / "hf", tmp_path / "megatron"
    _make_hf_model(BF16, hf_dir)
    command = [sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir)]
    command += ["--out", str(out), "--dtype", "bf16", "--verify", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    report = json.loads((out / "verify.json").read_text()) if out.exists() else None
    assert done.returncode == 0, (report, done.stderr[-6000:])
    # Passing means every one of the 64 positions has the same top-1 token (min_top1 0.99).
    assert report["layout"] == {"tp": 1, "pp": 1} and report["passed"], report
