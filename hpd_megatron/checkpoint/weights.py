"""Model weights in Megatron-Core's distributed checkpoint format.

dist_checkpointing stores each tensor with its global shape and how this rank's piece
maps into it, so weights saved at one TP/PP layout load at any other: this is the
engine's own resharding, and every checkpoint in the project goes through it.

A model-only checkpoint directory may also hold ``model.yaml`` (the ModelDescription)
and ``hf/`` (the Hugging Face config and tokenizer it was converted from), which the
converter back to Hugging Face reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing

from hpd_megatron.checkpoint.dist_save import load_sharded, save_sharded
from hpd_megatron.checkpoint.extra_state import drop_absent_extra_states, load_state
from hpd_megatron.checkpoint.publish import publish_directory
from hpd_megatron.checkpoint.training_state import TRACKER, iteration_dir, latest_step
from hpd_megatron.checkpoint.verify import CheckpointError, check_shapes, read_index
from hpd_megatron.models.description import ModelDescription

HF_FILES = "hf"
EXPORT_ENTRIES = frozenset({"metadata.json", ".metadata", "common.pt", "model.yaml", HF_FILES})
"""What a model-only export holds besides its ``*.distcp`` tensor files."""


def not_an_export(directory: Path) -> str | None:
    """Why ``directory`` is not recognisably a model-only export (None: it is, or empty).

    An export replaces the directory it is written to; anything else found there (a run
    directory, someone's data) is refused rather than deleted.
    """
    entries = sorted(directory.iterdir()) if directory.is_dir() else None
    if entries is None:
        return "not a directory"
    for entry in entries:
        if entry.name not in EXPORT_ENTRIES and entry.suffix != ".distcp":
            return f"not a previous export (it holds {entry.name}, which an export never writes)"
    if entries and not (directory / "metadata.json").is_file():
        return "not a previous export (no metadata.json)"
    return None


def save_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collectively save this stage's weights into ``directory`` (all ranks call it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_sharded(model.sharded_state_dict(), str(directory))


def export_model_weights(
    model: torch.nn.Module,
    directory: str | Path,
    description: ModelDescription | None = None,
    hf_files_from: str | Path | None = None,
    fully_parallel: bool = True,
) -> None:
    """Save into ``directory`` all or nothing (all ranks call it; see ``publish_directory``).

    ``description`` is written as ``model.yaml``; ``hf_files_from`` names a checkpoint whose
    ``hf/`` folder is carried over (for the way back to Hugging Face). An existing export
    is replaced only once the new one is complete, and only if it is one (``not_an_export``).
    """
    with publish_directory(directory, refuse=not_an_export, what="the export") as partial:
        save_sharded(model.sharded_state_dict(), str(partial), fully_parallel)
        if dist.get_rank() == 0:
            if description is not None:
                text = yaml.safe_dump(description.to_dict(), sort_keys=False)
                (partial / "model.yaml").write_text(text)
            if hf_files_from is not None and (Path(hf_files_from) / HF_FILES).is_dir():
                shutil.copytree(Path(hf_files_from) / HF_FILES, partial / HF_FILES)


def weights_directory(path: str | Path) -> Path:
    """The dist checkpoint a path names: itself, or a training run's latest iteration."""
    path = Path(path)
    if (path / TRACKER).is_file():
        return iteration_dir(path, latest_step(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return path


def load_model_weights(
    model: torch.nn.Module, path: str | Path, fully_parallel: bool = False
) -> None:
    """Collectively load weights saved at any layout into this rank's stage.

    ``path`` is a model-only checkpoint (a conversion or an export), a training checkpoint's
    ``iter_XXXXXXX`` directory, or a training checkpoint root (its latest iteration).
    ``fully_parallel``: each data-parallel replica reads a share and they exchange it.
    """
    directory = weights_directory(path)
    index = read_index(directory)
    template = model.sharded_state_dict()
    check_shapes(directory, template, index)
    dropped = drop_absent_extra_states(directory, template, index)
    # A training checkpoint nests the weights under "model" beside its plain entries.
    is_training_checkpoint = "step" in dist_checkpointing.load_common_state_dict(str(directory))
    if is_training_checkpoint:
        state = load_sharded({"model": template}, directory, fully_parallel)["model"]
    else:
        state = load_sharded(template, directory, fully_parallel)
    load_state(model, state, dropped, directory)
