"""``dist_checkpointing.save`` and ``load``, fully parallel over the data-parallel group.

Fully parallel (``performance.fully_parallel_save`` / ``_load``): a tensor that every
data-parallel replica holds is written, or read, by one of them only, the work spread
evenly over the group, as upstream's ``save_checkpoint`` / ``load_checkpoint``
(megatron/training/checkpointing.py) wrap the default strategies. The files are the same
either way, so a checkpoint loads whichever setting wrote it.

The save runs without Megatron's per-process spawn of a queue server.

Megatron's file writer collects write results through a ``multiprocessing`` Manager queue
that it creates on the first save of each process, from a *spawn* context: a fresh Python
that re-imports the launching module (``hpd_megatron.train`` pulls in torch and
Megatron-Core), several seconds per rank before the first checkpoint is written, and a
child process to tear down at exit. That queue only has to cross process boundaries for
Megatron's asynchronous saves. Every save here is synchronous: the results are put and taken
in this same process (the forked writers report through a queue of their own), so an
in-process queue does. (Not a multiprocessing.Queue: its put returns before the item can
be taken, and Megatron takes it with get_nowait.)
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)


def _data_parallel_group():
    """The group that holds replicas of this rank's shards; None when it is this rank alone."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def save_sharded(state: dict[str, Any], directory: str | Path, fully_parallel: bool = True) -> None:
    """Collectively write ``state`` (a sharded state dict) into the existing ``directory``."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    strategy = None
    group = _data_parallel_group() if fully_parallel else None
    if group is not None:
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)


def load_sharded(
    template: dict[str, Any], directory: str | Path, fully_parallel: bool = False
) -> dict[str, Any]:
    """Collectively read the tensors ``template`` (a sharded state dict) describes."""
    strategy = None
    group = _data_parallel_group() if fully_parallel else None
    if group is not None:
        strategy = FullyParallelLoadStrategyWrapper(
            get_default_load_sharded_strategy(str(directory)), group
        )
    return dist_checkpointing.load(template, str(directory), sharded_strategy=strategy)
