"""Where each tensor-parallel rank's vocabulary slice sits, and the few collectives on it.

Megatron splits the (padded) output layer into equal contiguous blocks: TP rank r holds
rows [r * width, (r + 1) * width). Only ids below the tokenizer's ``vocab_size`` are
real; every column at or beyond it is padding and is cut away *logically* (by slicing
the local width), so it never enters a softmax. Student and teacher may be padded to
different widths, in which case their slices of the real vocabulary start at different
ids on every rank but the first; ``realign_columns`` moves the teacher's columns onto the
student's layout for the methods that need both at the same id.

All helpers are no-ops without a TP group (``group is None``), which is how the
single-process tests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

FROM_PARALLEL_STATE = "parallel_state"
"""Default ``tp_group``: Megatron's TP group when parallel_state is initialised, else none."""

TPGroupArg = ProcessGroup | None | str


@dataclass(frozen=True)
class TPGroup:
    """A resolved TP group; ``group is None`` means a single rank (no communication)."""

    group: ProcessGroup | None
    rank: int
    size: int

    @property
    def active(self) -> bool:
        return self.group is not None and self.size > 1

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.active else group_rank


def resolve_tp_group(tp_group: TPGroupArg = FROM_PARALLEL_STATE) -> TPGroup:
    """Turn the user's ``tp_group`` argument into a ``TPGroup``."""
    if isinstance(tp_group, str):
        if tp_group != FROM_PARALLEL_STATE:
            expected = f"a ProcessGroup, None or {FROM_PARALLEL_STATE!r}"
            raise ValueError(f"tp_group: expected {expected}, got {tp_group!r}")
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return TPGroup(None, 0, 1)
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group is None:
        return TPGroup(None, 0, 1)
    return TPGroup(tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group))


@dataclass(frozen=True)
class VocabShard:
    """One rank's slice of a padded vocabulary, cut to the real vocabulary."""

    start: int
    """Global id of local column 0."""
    width: int
    """Local (padded) width: the tensor's last dimension."""
    real_width: int
    """Local columns whose global id is below vocab_size (a prefix of the shard; may be 0)."""

    @property
    def end(self) -> int:
        """One past the last real global id held here."""
        return self.start + self.real_width

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.end)

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Local column of each id, clamped into range (mask with ``owns``)."""
        return (ids - self.start).clamp(0, max(self.real_width - 1, 0))


def vocab_shard(name: str, width: int, vocab_size: int, tp: TPGroup) -> VocabShard:
    """The shard of a ``width``-wide vocab-parallel tensor on this rank; checks coverage."""
    if width * tp.size < vocab_size:
        raise ValueError(
            f"{name}: {tp.size} tensor-parallel shard(s) of width {width} cover only "
            f"{width * tp.size} vocabulary rows, fewer than vocab_size={vocab_size}"
        )
    start = tp.rank * width
    return VocabShard(start, width, max(0, min(width, vocab_size - start)))


def shard_of_rank(width: int, vocab_size: int, rank: int) -> VocabShard:
    start = rank * width
    return VocabShard(start, width, max(0, min(width, vocab_size - start)))


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp, tp: TPGroup) -> torch.Tensor:
    """In-place all-reduce over the TP group (no autograd: callers reduce detached values)."""
    if tp.active:
        dist.all_reduce(tensor, op=op, group=tp.group)
    return tensor


def broadcast_from_first_(tensor: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Make ``tensor`` identical on all TP ranks (TP rank 0's copy wins)."""
    if tp.active:
        dist.broadcast(tensor, src=tp.global_rank(0), group=tp.group)
    return tensor


def realign_columns(
    rows: torch.Tensor, source_width: int, target_width: int, vocab_size: int, tp: TPGroup
) -> torch.Tensor:
    """Move real-vocabulary columns from a ``source_width`` layout to a ``target_width`` one.

    ``rows`` is [n, real columns of this rank's source shard]; the result is
    [n, real columns of this rank's target shard] with the same global ids. Each rank
    sends the overlap of its source shard with every other rank's target shard
    (point-to-point), so only the misaligned columns travel, never the vocabulary.
    """
    me = tp.rank
    src_mine = shard_of_rank(source_width, vocab_size, me)
    dst_mine = shard_of_rank(target_width, vocab_size, me)
    out = rows.new_empty(rows.shape[0], dst_mine.real_width)
    ops, pending = [], []
    for other in range(tp.size):
        # What I send to `other`: my source columns inside its target shard.
        dst_other = shard_of_rank(target_width, vocab_size, other)
        lo, hi = max(src_mine.start, dst_other.start), min(src_mine.end, dst_other.end)
        if hi > lo:
            piece = rows[:, lo - src_mine.start : hi - src_mine.start]
            if other == me:
                out[:, lo - dst_mine.start : hi - dst_mine.start].copy_(piece)
            else:
                ops.append(
                    dist.P2POp(dist.isend, piece.contiguous(), tp.global_rank(other), tp.group)
                )
        # What I receive from `other`: its source columns inside my target shard.
        src_other = shard_of_rank(source_width, vocab_size, other)
        lo, hi = max(src_other.start, dst_mine.start), min(src_other.end, dst_mine.end)
        if hi > lo and other != me:
            buffer = rows.new_empty(rows.shape[0], hi - lo)
            ops.append(dist.P2POp(dist.irecv, buffer, tp.global_rank(other), tp.group))
            pending.append((lo - dst_mine.start, buffer))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        for offset, buffer in pending:
            out[:, offset : offset + buffer.shape[1]].copy_(buffer)
    return out
