"""`make test-gpu` fails, not skips, on a node whose GPUs torch cannot use."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_sessionstart(session: pytest.Session) -> None:
    from hpd_megatron.parallel.device import visible_gpus

    if os.environ.get("HPD_GPU_TESTS") == "1" and not torch.cuda.is_available():
        evidence = visible_gpus()
        if evidence:
            raise pytest.UsageError(
                f"GPUs are visible ({evidence}) but torch {torch.__version__} has no CUDA: "
                "the GPU tests cannot run (a CPU .venv? rebuild it on this node: make venv)"
            )
