"""Model weights in Megatron-Core's distributed checkpoint format.

dist_checkpointing stores each tensor with its global shape and how this rank's piece
maps into it, so weights saved at one TP/PP layout load at any other: this is the
engine's own resharding, and every checkpoint in the project goes through it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing


def save_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collectively save this stage's weights into ``directory`` (all ranks call it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def load_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collectively load weights saved at any layout into this rank's stage."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a Megatron-Core distributed checkpoint (no metadata.json)")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)
