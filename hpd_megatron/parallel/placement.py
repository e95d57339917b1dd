"""The device the models compute on, and moving host tensors onto it.

Everything a model, a loss or a collective is handed lives on the current device: the
process's GPU under CUDA (NCCL accepts nothing else), the CPU otherwise. As upstream
Megatron-LM moves each micro-batch (pretrain_gpt.py ``get_batch``, through
megatron/training/utils.py ``get_batch_on_this_tp_rank``: ``.cuda(non_blocking=True)``),
host tensors are copied from pinned memory without blocking the host. On the CPU the
move returns the tensor itself, so CPU results are unchanged bit for bit.
"""

from __future__ import annotations

import torch


def current_device() -> torch.device:
    """This process's GPU (``torch.cuda.current_device()``) under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (default: the current device); the tensor itself if it is there.

    A host tensor bound for a GPU is pinned first (only then is the copy truly asynchronous;
    pinning needs CUDA, so it happens only for a CUDA target).
    """
    device = current_device() if device is None else device
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=True)
