"""Small agreements between ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpd_megatron.parallel import placement


def any_rank(flag: bool) -> bool:
    """Collective over the world: True on every rank when ``flag`` is True on any rank."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=placement.current_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
