"""The device a run computes on, decided once, and never a silent fall-back to the CPU.

``device: auto`` (the default) uses CUDA when torch has it. When torch has no CUDA but the
node shows GPUs (``CUDA_VISIBLE_DEVICES``, ``SLURM_GPUS_ON_NODE``, ``nvidia-smi``), the run
stops with one line: the usual cause is a CPU virtual environment built on a login node,
and a job that trained on the CPU for hours instead would be worse than no job.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from typing import Literal

import torch

from hpd_megatron.errors import ConfigError

Device = Literal["auto", "cuda", "cpu"]
_HIDDEN = ("", "-1", "none", "NoDevFiles")


def visible_gpus(env: Mapping[str, str] | None = None) -> str | None:
    """What shows that this process was given GPUs (None: nothing does).

    ``CUDA_VISIBLE_DEVICES``, when set, decides (empty hides every GPU, as the CPU test
    suite does); otherwise Slurm's GPU count, then ``nvidia-smi -L``.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        value = env["CUDA_VISIBLE_DEVICES"].strip()
        return None if value in _HIDDEN else f"CUDA_VISIBLE_DEVICES={value}"
    slurm_gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if slurm_gpus.isdigit() and int(slurm_gpus) > 0:
        return f"SLURM_GPUS_ON_NODE={slurm_gpus}"
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return f"nvidia-smi lists {len(gpus)} GPU(s)" if listed.returncode == 0 and gpus else None


def resolve_device(requested: Device, env: Mapping[str, str] | None = None) -> str:
    """ "cuda" or "cpu" for the ``device`` setting, or a ConfigError saying what is wrong."""
    if torch.cuda.is_available():
        if requested == "cpu":
            raise ConfigError(
                "device: cpu, but torch sees CUDA GPUs; hide them (CUDA_VISIBLE_DEVICES=) to "
                "run on the CPU"
            )
        return "cuda"
    built = f"torch {torch.__version__} has no CUDA"
    if requested == "cuda":
        raise ConfigError(f"device: cuda, but {built} (a CPU build, or no usable GPU driver)")
    evidence = visible_gpus(env) if requested == "auto" else None
    if evidence:
        raise ConfigError(
            f"device: auto: GPUs are visible ({evidence}) but {built}; the usual cause is a "
            "CPU virtual environment built on a login node: rebuild .venv on a GPU node "
            "(make venv), or set device=cpu to run on the CPU on purpose"
        )
    return "cpu"
