"""Which samples each data-parallel rank trains on at each step: deterministic and resumable.

The samples form one endless stream: epoch e is a permutation of all sample indices drawn
with seed ``seed + e``, and the epochs follow each other. Global batch k is the stream's
samples ``[k * global_batch_size, (k + 1) * global_batch_size)``; a batch may straddle two
epochs, so every epoch visits every sample exactly once. The stream depends on the seed and
the number of samples only; where a run stands in it is ``consumed_samples``. So:

- DP size never changes what a step trains on: rank r of DP takes the r-th contiguous
  share of the global batch and cuts it into micro-batches, and the ranks' shares together
  are DP=1's global batch, in the same order;
- resuming from ``state_dict()`` continues the stream exactly, at any DP size (and even at
  another global batch size).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy

from hpd_megatron.errors import ConfigError


class DistributedBatchSampler:
    """Yields, per step, this rank's micro-batches: a list of lists of sample indices."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ConfigError(f"data: the dataset has no samples (num_samples={num_samples})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"schedule.global_batch_size: {global_batch_size} is not a multiple of "
                f"micro_batch_size x DP = {micro_batch_size} x {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed_samples // self.num_samples

    def global_batch(self, start: int) -> list[int]:
        """Stream samples ``[start, start + global_batch_size)``."""
        indices = []
        for position in range(start, start + self.global_batch_size):
            epoch, offset = divmod(position, self.num_samples)
            indices.append(int(_epoch_order(self.num_samples, self.seed, epoch)[offset]))
        return indices

    def __iter__(self) -> Iterator[list[list[int]]]:
        share = self.global_batch_size // self.dp_size
        while True:
            batch = self.global_batch(self.consumed_samples)
            # Counted as soon as the step is handed out: a checkpoint written after the
            # step resumes with the next one.
            self.consumed_samples += self.global_batch_size
            mine = batch[self.dp_rank * share : (self.dp_rank + 1) * share]
            yield [
                mine[i : i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)
            ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different seed or dataset size would silently continue another stream.
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"data sampler: the checkpoint was written with {key}={state[key]}, "
                    f"this run has {key}={getattr(self, key)}"
                )
        self.consumed_samples = int(state["consumed_samples"])


@functools.lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> numpy.ndarray:
    # Cached: a global batch needs at most two epochs' orders (unless it exceeds the dataset).
    return numpy.random.default_rng(seed + epoch).permutation(num_samples)
