"""``make gpu-check DRY_RUN=1``: every step of the first GPU session's command, tiny, on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["test-gpu", "gpu_bench", "rollout_bench", "fp8_teacher", "convert_verify_bf16"]


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    done = subprocess.run(
        ["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_CHECK_OUT={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    statuses = {step["name"]: step["status"] for step in report["steps"]}
    assert done.returncode == 0, (statuses, done.stdout[-3000:], done.stderr[-3000:])
    assert list(statuses) == STEPS and set(statuses.values()) == {"passed"}
    steps = {step["name"]: step["results"] for step in report["steps"]}
    assert steps["fp8_teacher"]["relative_difference"] == 0.0  # bf16 both ways on the CPU
    assert (
        steps["convert_verify_bf16"]["passed"] and steps["rollout_bench"]["decode_tokens_per_s"] > 0
    )
    summary = (tmp_path / "gpu_check_dry_run.md").read_text()
    assert all(f"| {name} | passed |" in summary for name in STEPS)
