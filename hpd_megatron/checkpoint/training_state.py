"""Complete training checkpoints: student weights, optimizer, schedule, data position, RNG.

Layout (Megatron's convention) under the checkpoint root:

    iter_0000100/                      one dist_checkpointing directory per save
    latest_checkpointed_iteration.txt  the step of the newest *complete* save

A save goes to ``iter_XXXXXXX.partial`` and is renamed only after every rank has written
its part; the tracker is replaced (write, then atomic rename) after that. A process killed
mid-save therefore leaves the previous checkpoint as the latest one. The teacher is never
saved: it is an input of the run, not its state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> Optional[int]:
    """The step named by the tracker, or None when there is no tracker."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected a step number, found {text!r}") from None
    if not (iteration_dir(root, step) / "metadata.json").is_file():
        raise CheckpointError(f"{tracker}: names step {step} but {iteration_dir(root, step)} "
                              "is missing or incomplete")
    return step


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model: torch.nn.Module, optimizer: Any, is_loading: bool,
                   with_rng: bool = True) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading),
        "world_size": world,
    }
    if with_rng:
        # Every rank's generators differ (TP-rank seeds), so each keeps its own.
        state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: Any,
                    scheduler: Any, extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Collectively save the state after ``step``; returns the iteration directory."""
    root = Path(root)
    final = iteration_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    # Plain (non-sharded) entries are written once, by rank 0, into common.pt.
    state.update(step=step, scheduler=scheduler.state_dict(), extra=extra)
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        tracker = root / TRACKER
        temporary = tracker.with_name(TRACKER + ".tmp")
        temporary.write_text(f"{step}\n")
        os.replace(temporary, tracker)
        complete = sorted(p for p in root.glob("iter_*") if p.suffix != ".partial")
        for old in complete[: max(len(complete) - keep_last, 0)]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: Any,
                    scheduler: Any) -> dict[str, Any]:
    """Collectively restore the state saved after ``step``; returns its ``extra`` dict."""
    directory = iteration_dir(root, step)
    saved_world = dist_checkpointing.load_common_state_dict(str(directory)).get("world_size")
    # Per-rank RNG states only mean something on the same grid; on another layout the
    # generators keep the seeds initialize_parallel derived (weights, optimizer state,
    # schedule and data position still carry over exactly).
    same_grid = saved_world == dist.get_world_size()
    template = _sharded_state(model, optimizer, is_loading=True, with_rng=same_grid)
    try:
        state = dist_checkpointing.load(template, str(directory))
    except Exception as error:  # noqa: BLE001 - re-raised with the directory named
        raise CheckpointError(f"{directory}: cannot be loaded into this model "
                              f"({type(error).__name__}: {error})") from error
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_grid:
        _set_rng_state(state["rng"])
    return state["extra"]
