"""Train like ``python -m hpd_megatron.train`` but SIGKILL every rank in the middle of one save.

    torchrun --nproc-per-node N tests/kill_during_save.py STEP --config RECIPE [overrides]

The kill comes after every rank has written its part of ``iter_STEP.partial`` and before
the rename that would complete it: the latest moment a crash can still lose that save.
Every rank dies at once, as under ``scancel --signal=KILL`` or a node failure.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist
from megatron.core import dist_checkpointing

from hpd_megatron.train import main

if __name__ == "__main__":
    kill_at = int(sys.argv.pop(1))
    save = dist_checkpointing.save

    def save_then_die(state, directory, *args, **kwargs):
        save(state, directory, *args, **kwargs)
        dist.barrier()
        if state.get("step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    main()
