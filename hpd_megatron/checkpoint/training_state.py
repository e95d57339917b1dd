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
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer

from hpd_megatron.checkpoint.dist_save import load_sharded, save_sharded
from hpd_megatron.checkpoint.extra_state import drop_absent_extra_states, load_state
from hpd_megatron.checkpoint.publish import fsync_path, publish_directory
from hpd_megatron.checkpoint.verify import (
    CheckpointError,
    check_safe_loading,
    check_shapes,
    read_index,
)

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> int | None:
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
        raise CheckpointError(
            f"{tracker}: names step {step} but {iteration_dir(root, step)} is missing or "
            f"incomplete{_earlier_intact(root, step, lambda _: None)}"
        )
    return step


def _earlier_intact(root: str | Path, step: int, check: Any) -> str:
    """How to resume from the newest save before ``step`` that ``check`` accepts (a clause)."""
    for earlier in reversed([s for s in complete_steps(root) if s < step]):
        try:
            check(iteration_dir(root, earlier))
        except CheckpointError:
            continue
        return (
            f"; {iteration_dir(root, earlier)} is intact: to resume from it, "
            f"write {earlier} into {Path(root) / TRACKER}"
        )
    return "; no earlier save is intact"


def saved_extra(root: str | Path, step: int) -> dict[str, Any]:
    """The ``extra`` dict of a save, read without loading any tensor (no process group)."""
    check_safe_loading()
    return dist_checkpointing.load_common_state_dict(str(iteration_dir(root, step)))["extra"]


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _grid() -> list[int]:
    return [
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    ]


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    # Megatron wraps the optimizer of each model chunk; the chunks share one setting.
    chunks = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(type(chunk).__name__ == "DistributedOptimizer" for chunk in chunks)


def _materialise_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer the state entries a checkpoint is loaded into.

    Without Apex or TE (CPU), Megatron's DistributedOptimizer reads the step count from
    torch's per-parameter state, which does not exist before the first step. Its own
    helper takes one step with zero gradients; everything it touches (weights, moments,
    step) is overwritten by the load that follows.
    """
    for chunk in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(chunk).__name__ == "DistributedOptimizer" and not chunk.optimizer.state:
            chunk._init_optimizer_states_with_dummy_values()


def _give_each_parameter_its_step(optimizer: Any) -> None:
    """One ``step`` tensor per parameter, holding the step its param group saved.

    Without Apex or TE (CPU), torch's AdamW counts steps per parameter, in place, and
    Megatron's distributed-optimizer loaders get that count wrong: ``load_state_dict``
    hands one shared tensor to every parameter (so a step then advances it once per
    parameter), and the dp_reshardable loader copies back the value the load template
    held (the dummy step's 1). Either way Adam's bias correction runs on a wrong step
    from the first resumed update on. The param groups carry the saved step.
    """
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # fused Adam keeps the step in the param groups only
    for chunk in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(chunk).__name__ != "DistributedOptimizer":
            continue
        for group in chunk.optimizer.param_groups:
            for param in group["params"]:
                if param in chunk.optimizer.state:
                    step = torch.tensor(float(group["step"]), dtype=torch.float32)
                    chunk.optimizer.state[param]["step"] = step


def _load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, around gaps of Megatron's torch-AdamW fallback.

    Without Apex or TE, torch's AdamW keeps a per-parameter ``step`` that Megatron's
    fully_reshardable loader copies into but never provides: it is set aside while the
    moments and master weights load. Every format then gets its steps from the param
    groups (``_give_each_parameter_its_step``).
    """
    chunks = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chunks) == 1 and state.get("param_state_sharding_type") == "fully_reshardable":
        chunk, param_state = chunks[0], state.pop("param_state")
        chunk.load_state_dict(state)  # param groups, step, scheduler-free parts
        for entry in chunk.optimizer.state.values():
            entry.pop("step", None)
        chunk.load_parameter_state_from_fully_reshardable(param_state)
    else:
        optimizer.load_state_dict(state)
    _give_each_parameter_its_step(optimizer)


def _sharded_state(
    model: torch.nn.Module,
    optimizer: Any | None,
    is_loading: bool,
    optimizer_format: str,
    with_rng: bool = True,
) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        if is_loading:
            _materialise_distributed_optimizer_state(optimizer)
        # The format only concerns the distributed optimizer; the plain one ignores it.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state,
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_format},
        )
    if with_rng:
        # Every rank's generators differ (TP-rank seeds), so each keeps its own.
        state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    extra: dict[str, Any],
    optimizer_format: str = "dp_reshardable",
    fully_parallel: bool = True,
) -> Path:
    """Collectively save the state after ``step``; returns the iteration directory.

    ``optimizer_format`` is Megatron's sharding type for the distributed optimizer:
    ``dp_reshardable`` writes each rank's buffers as they are (fully parallel; resumes at
    another DP size only), ``fully_reshardable`` gathers each TP x PP shard's state on its
    DP rank 0 into per-parameter tensors (slower, more memory; resumes at any layout).
    The tracker names the new step only once the directory is complete. ``fully_parallel``
    spreads the writing of replicated tensors over the data-parallel ranks.
    """
    root = Path(root)
    final = iteration_dir(root, step)
    with publish_directory(final, what=f"the checkpoint of step {step}") as partial:
        state = _sharded_state(
            model, optimizer, is_loading=False, optimizer_format=optimizer_format
        )
        # Plain (non-sharded) entries are written once, by rank 0, into common.pt.
        state.update(
            step=step,
            scheduler=scheduler.state_dict(),
            extra=extra,
            grid=_grid(),
            distributed_optimizer=_uses_distributed_optimizer(optimizer),
            optimizer_format=optimizer_format,
        )
        save_sharded(state, str(partial), fully_parallel)
    if dist.get_rank() == 0:
        _write_tracker(root, step)
    dist.barrier()
    return final


def _write_tracker(root: Path, step: int) -> None:
    """Replace the tracker atomically and durably (the save it names is already synced)."""
    tracker = root / TRACKER
    temporary = tracker.with_name(TRACKER + ".tmp")
    with open(temporary, "w") as file:
        file.write(f"{step}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, tracker)
    fsync_path(root)


def complete_steps(root: str | Path) -> list[int]:
    """The steps of the complete saves under ``root``, oldest first."""
    steps = []
    for path in Path(root).glob("iter_*"):
        number = path.name.removeprefix("iter_")
        if number.isdigit() and len(number) == 7 and (path / "metadata.json").is_file():
            steps.append(int(number))
    return sorted(steps)


def remove_old_checkpoints(root: str | Path, keep_last: int) -> None:
    """Rank 0: delete all but the ``keep_last`` newest complete saves.

    The save the tracker names and the newest complete one are always kept, whatever
    ``keep_last`` says and whatever stale ``iter_*`` directory lies beside them.
    """
    steps = complete_steps(root)
    keep = set(steps[-max(keep_last, 1) :])
    named = latest_step(root)
    if named is not None:
        keep.add(named)
    for step in steps:
        if step not in keep:
            shutil.rmtree(iteration_dir(root, step))


def _check_optimizer_resumable(directory: Path, common: dict[str, Any], optimizer: Any) -> None:
    """The saved optimizer state fits this optimizer and layout, or one error saying how."""
    saved_distributed = common.get("distributed_optimizer")
    if saved_distributed != _uses_distributed_optimizer(optimizer):
        raise CheckpointError(
            f"{directory}: the optimizer state was saved with "
            f"optimizer.use_distributed_optimizer={str(saved_distributed).lower()}; resume "
            "with that setting, or set checkpoint.load_optimizer=false to keep the weights, "
            "schedule and data position and restart the Adam moments from zero"
        )
    saved_grid = common.get("grid")
    fixed_shards = saved_distributed and common.get("optimizer_format") == "dp_reshardable"
    if fixed_shards and saved_grid[:2] != _grid()[:2]:
        raise CheckpointError(
            f"{directory}: the distributed optimizer's state was saved in the dp_reshardable "
            f"format at TP{saved_grid[0]} PP{saved_grid[1]} and cannot be resharded to "
            f"TP{_grid()[0]} PP{_grid()[1]}; resume at that TP x PP (any DP), or set "
            "checkpoint.load_optimizer=false to restart the Adam moments from zero "
            "(save with checkpoint.optimizer_format=fully_reshardable to avoid this)"
        )


def load_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    load_optimizer: bool = True,
    fully_parallel: bool = False,
) -> dict[str, Any]:
    """Collectively restore the state saved after ``step``; returns its ``extra`` dict.

    Weights, schedule and data position load at any TP/PP/DP. The optimizer's moments
    load at any layout when the optimizer kind is the same, except that the distributed
    optimizer's ``dp_reshardable`` format needs the same TP x PP; with
    ``load_optimizer=False`` they start from zero instead. ``fully_parallel``: each
    data-parallel replica reads a share of the replicated tensors and they exchange them.
    """
    directory = iteration_dir(root, step)
    check_safe_loading()
    try:
        index = read_index(directory)
    except CheckpointError as error:
        raise CheckpointError(f"{error}{_earlier_intact(root, step, read_index)}") from None
    common = dist_checkpointing.load_common_state_dict(str(directory))
    if load_optimizer:
        _check_optimizer_resumable(directory, common, optimizer)
    saved_format, saved_grid = common.get("optimizer_format"), common.get("grid")
    # Per-rank RNG states only mean something on the same grid; on another layout the
    # generators keep the seeds initialize_parallel derived.
    same_grid = saved_grid == _grid()
    template = _sharded_state(
        model,
        optimizer if load_optimizer else None,
        is_loading=True,
        optimizer_format=saved_format,
        with_rng=same_grid,
    )
    check_shapes(directory, template, index)
    # A CPU checkpoint resumed with Transformer Engine lacks the TE norms' extra states.
    dropped = drop_absent_extra_states(directory, template, index)
    try:
        state = load_sharded(template, directory, fully_parallel)
    except Exception as error:  # noqa: BLE001 - re-raised with the directory named
        raise CheckpointError(
            f"{directory}: cannot be loaded into this model ({type(error).__name__}: {error})"
        ) from error
    load_state(model, state["model"], dropped, directory)
    if load_optimizer:
        # Some of Megatron's loaders copy into fp32 master weights (leaves that require
        # grad) without no_grad themselves.
        with torch.no_grad():
            _load_optimizer_state(optimizer, state["optimizer"])
    else:
        # The optimizer was built before these weights were loaded: its fp32 main weights
        # (bf16 runs) still hold the old ones and its first step would write them back.
        # As upstream's load_checkpoint (megatron/training/checkpointing.py) does.
        optimizer.reload_model_params()
    scheduler.load_state_dict(common["scheduler"])
    if same_grid:
        _set_rng_state(state["rng"])
    return common["extra"]
