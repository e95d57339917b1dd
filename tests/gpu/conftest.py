"""`make test-gpu` fails, not skips, where torch has no CUDA: all-skipped would read as passed.

Without HPD_GPU_TESTS=1 (the CPU suite, which hides the GPUs) the GPU tests just skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from hpd_megatron.parallel.initialize import use_one_cuda_connection

# Before any test touches CUDA; spawned ranks and torchrun children inherit it.
use_one_cuda_connection()


def pytest_sessionstart(session: pytest.Session) -> None:
    from hpd_megatron.parallel.device import visible_gpus

    if os.environ.get("HPD_GPU_TESTS") != "1" or torch.cuda.is_available():
        return
    evidence = visible_gpus()
    if evidence:
        raise pytest.UsageError(
            f"GPUs are visible ({evidence}) but torch {torch.__version__} has no CUDA: "
            "the GPU tests cannot run (a CPU .venv? rebuild it on this node: make venv)"
        )
    raise pytest.UsageError(
        f"HPD_GPU_TESTS=1 (make test-gpu) but no GPU is visible and torch {torch.__version__} "
        "has no CUDA: run the GPU tests on a GPU node"
    )
