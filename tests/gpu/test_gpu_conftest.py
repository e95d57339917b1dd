"""On a CPU build of torch: `make test-gpu` (HPD_GPU_TESTS=1) stops with one line, never
reports the GPU tests as skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
@pytest.mark.parametrize(
    "visible,message",
    [
        ("0", "GPUs are visible (CUDA_VISIBLE_DEVICES=0) but torch"),
        ("", "HPD_GPU_TESTS=1 (make test-gpu) but no GPU is visible"),
    ],
)
def test_gpu_tests_fail_without_cuda(visible, message):
    env = dict(os.environ, HPD_GPU_TESTS="1", CUDA_VISIBLE_DEVICES=visible)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(GPU_TESTS)],
        env=env,
        capture_output=True,
        text=True,
        cwd=GPU_TESTS.parent.parent,
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    assert message in done.stderr, done.stderr
    assert "skipped" not in done.stdout
