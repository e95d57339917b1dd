"""The process group a conversion runs in: one process, or one per TP x PP position.

Conversions only need torch.distributed (dist_checkpointing is collective) and, for
``--verify``, Megatron's parallel_state at the requested layout. A single process
writes every position's pieces itself and verifies at TP1 PP1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from hpd_megatron.errors import ConversionError
from hpd_megatron.parallel.layout import ParallelLayout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_layout(tp: int, pp: int) -> ParallelLayout:
    """The layout this launch runs at: TP x PP under that many processes, else TP1 PP1 alone."""
    from hpd_megatron.parallel.initialize import read_launch_environment

    world = read_launch_environment().world_size
    if world == tp * pp:
        return ParallelLayout(tp, pp)
    if world == 1:
        return ParallelLayout(1, 1)
    raise ConversionError(
        f"launched with {world} processes; use 1 or TP x PP = {tp} x {pp} = {tp * pp}"
    )


@contextmanager
def conversion_processes(tp: int, pp: int) -> Iterator[ParallelLayout]:
    """Initialise torch.distributed and parallel_state for a conversion; tear down after."""
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    layout = world_layout(tp, pp)
    env = dict(os.environ)
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" not in env:
        # Alone: a free port, so two single-process conversions never collide.
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = str(_free_port())
    initialize_parallel(layout, env=env)
    try:
        yield layout
    finally:
        destroy_parallel()
