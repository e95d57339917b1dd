"""``dist_checkpointing.save`` without Megatron's per-process spawn of a queue server.

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

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async


def save_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """Collectively write ``state`` (a sharded state dict) into the existing ``directory``."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(state, str(directory))
