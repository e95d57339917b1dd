"""Model weights in Megatron-Core's distributed checkpoint format.

dist_checkpointing stores each tensor with its global shape and how this rank's piece
maps into it, so weights saved at one TP/PP layout load at any other: this is the
engine's own resharding, and every checkpoint in the project goes through it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import dist_checkpointing


def save_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collectively save this stage's weights into ``directory`` (all ranks call it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def export_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Save into ``directory`` all or nothing: write beside it, then rename (all ranks call it).

    An existing export is replaced only once the new one is complete.
    """
    import shutil

    import torch.distributed as dist

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    save_model_weights(model, partial)
    dist.barrier()
    if dist.get_rank() == 0:
        previous = directory.with_name(directory.name + ".previous")
        if directory.exists():
            os.replace(directory, previous)
        os.replace(partial, directory)
        if previous.exists():
            shutil.rmtree(previous)
    dist.barrier()


def load_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collectively load weights saved at any layout into this rank's stage."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a Megatron-Core distributed checkpoint (no metadata.json)")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)
