"""This data-parallel rank's micro-batches for each step, from the prepared data."""

from __future__ import annotations

import torch

from hpd_megatron.data import DataError, DistillationDataset, DistributedBatchSampler
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.schedule import Batch


class TrainingFeed:
    """Dataset + resumable sampler; every sample also carries its global index.

    The index makes HPD's per-sequence sampling seed independent of the layout.
    """

    def __init__(
        self, run: RunConfig, student: ModelDescription, dp_rank: int, dp_size: int
    ) -> None:
        if not run.data.train:
            raise DataError(
                "data.train: no prepared data given (the --output-prefix of tools/prepare_data.py)"
            )
        # Packing depends on the data and the seed only: every rank, DP size and resume
        # sees the same samples.
        self.dataset = DistillationDataset(
            run.data.train, run.data.seq_length, pack=run.data.pack, seed=run.seed
        )
        self.sampler = DistributedBatchSampler(
            len(self.dataset),
            run.schedule.global_batch_size,
            run.schedule.micro_batch_size,
            dp_rank,
            dp_size,
            run.seed,
        )
        self._steps = iter(self.sampler)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the steps a checkpoint had consumed."""
        self.sampler.load_state_dict(state)
        self._steps = iter(self.sampler)

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next optimizer step."""
        micro_batches = []
        for indices in next(self._steps):
            batch = self.dataset.batch(indices)
            batch["sample_index"] = torch.tensor(indices)
            micro_batches.append(batch)
        return micro_batches
