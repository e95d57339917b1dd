"""The device setting: CUDA when torch has it, never a silent CPU run on a GPU node."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hpd_megatron.errors import ConfigError
from hpd_megatron.parallel.device import resolve_device, visible_gpus

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU build of torch")


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    """An ``nvidia-smi`` on PATH that lists two GPUs, as on a GPU node."""
    program = tmp_path / "nvidia-smi"
    program.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: a)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: b)'\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def test_evidence_of_gpus(fake_nvidia_smi, monkeypatch):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == "CUDA_VISIBLE_DEVICES=0,1"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "8"}) is None
    assert visible_gpus({"SLURM_GPUS_ON_NODE": "8"}) == "SLURM_GPUS_ON_NODE=8"
    monkeypatch.setenv("PATH", fake_nvidia_smi["PATH"])
    assert visible_gpus({}) == "nvidia-smi lists 2 GPU(s)"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert visible_gpus({}) is None


def test_a_cpu_torch_on_a_gpu_node_stops_with_the_cause():
    with pytest.raises(ConfigError) as error:
        resolve_device("auto", {"SLURM_GPUS_ON_NODE": "8"})
    message = str(error.value)
    assert message.startswith("device: auto: GPUs are visible (SLURM_GPUS_ON_NODE=8) but torch")
    assert "CPU virtual environment built on a login node" in message
    with pytest.raises(ConfigError, match="device: cuda, but torch .* has no CUDA"):
        resolve_device("cuda", {})


def test_the_cpu_when_asked_or_when_no_gpu_is_shown():
    assert resolve_device("cpu", {"SLURM_GPUS_ON_NODE": "8"}) == "cpu"
    assert resolve_device("auto", {"CUDA_VISIBLE_DEVICES": ""}) == "cpu"


def test_the_recipe_setting_is_checked(tmp_path):
    from hpd_megatron.training.config import load_run_config
    from tests.training_runs import STUDENT

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"student: {{model: {STUDENT}}}\nloss: {{method: sft}}\ndevice: gpu\n")
    with pytest.raises(ConfigError, match="device: expected one of auto, cuda, cpu, got 'gpu'"):
        load_run_config(recipe)
