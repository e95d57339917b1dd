"""On-policy rollouts: the student writes the replies of a share of each global batch.

The third data regime of the unified view (fixed data, teacher data, student samples). At
every step, ``floor(fraction x global_batch_size)`` samples of the global batch, spread
evenly over its positions, become rollouts:

1. the prompt is the sample's record before its first supervised token;
2. the student continues it with its current weights (``eval.generate``: Megatron-Core's
   KV cache at the run's TP x PP, this data-parallel rank's rollout rows in one batch);
3. prompt + reply replace the record (``DistillationDataset.sample_of``): the prompt is
   unsupervised, the reply supervised, with the EOS that ended it when it did. The teacher
   then scores the sample in the ordinary forward, whatever ``loss.method`` is.

Reproducibility: which samples roll out depends on their position in the global batch,
and row r's token at position t on (rollout seed, step, sample index, t) alone, never on
the DP size, the micro-batch size or the other rows (``generate(row_seeds=...)``: Philox
keyed by the row's seed below, counted by t, for all rows at once on the device). So a
resumed run, whose weights are bit-identical, writes the same rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils.data import default_collate

from hpd_megatron.data.dataset import DistillationDataset
from hpd_megatron.eval.generate import Generation, SamplingSettings, generate
from hpd_megatron.parallel.placement import to_device
from hpd_megatron.training.components import sample_seed
from hpd_megatron.training.config import RolloutConfig
from hpd_megatron.training.schedule import Batch

ROLLOUT_STREAM = 1_000_003
"""Mixed into the rollout seeds so they never coincide with HPD's per-sample seeds."""


def is_rollout(position: int, fraction: float) -> bool:
    """Whether the sample at ``position`` of the global batch rolls out: the positions
    where floor(position x fraction) steps up, so that any prefix of the batch holds its
    share (exactly, in rationals) and every DP rank's slice gets about the same number."""
    share = Fraction(fraction).limit_denominator(1_000_000)
    return math.floor((position + 1) * share) > math.floor(position * share)


@dataclass
class RolloutStats:
    """This rank's rollouts of one step."""

    samples: int = 0
    reply_tokens: int = 0
    finished: int = 0
    """Replies that ended with EOS (the others hit max_new_tokens or the sample's end)."""

    def reduced(self) -> dict[str, float]:
        """Collective over the data-parallel group: the step's rollout metrics."""
        totals = to_device(
            torch.tensor([self.samples, self.reply_tokens, self.finished], dtype=torch.float64)
        )
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        samples, tokens, finished = totals.tolist()
        return {
            "rollout/samples": samples,
            "rollout/reply_tokens": tokens / max(samples, 1.0),
            "rollout/eos_share": finished / max(samples, 1.0),
        }


class RolloutMaker:
    """Replaces this rank's rollout samples of a step by the student's own replies."""

    def __init__(
        self,
        settings: RolloutConfig,
        dataset: DistillationDataset,
        run_seed: int,
        vocab_size: int,
        eos_id: int | None,
    ) -> None:
        self.settings = settings
        self.dataset = dataset
        self.seed = run_seed if settings.seed is None else settings.seed
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.sampling = SamplingSettings(
            settings.temperature, settings.top_p, settings.max_new_tokens
        )

    def rows(self, micro_batches: list[Batch], first_position: int) -> list[tuple[int, int]]:
        """(micro-batch, row) of every rollout sample; ``first_position`` is this rank's
        first sample's position in the global batch."""
        chosen, position = [], first_position
        for index, batch in enumerate(micro_batches):
            for row in range(len(batch["sample_index"])):
                if is_rollout(position, self.settings.fraction):
                    chosen.append((index, row))
                position += 1
        return chosen

    def row_seed(self, step: int, sample_index: int) -> int:
        return sample_seed(self.seed + ROLLOUT_STREAM, step, sample_index)

    def replace(
        self,
        model: torch.nn.Module,
        step: int,
        micro_batches: list[Batch],
        first_position: int,
    ) -> tuple[list[Batch], RolloutStats]:
        """Collective over the model-parallel group: the micro-batches with the rollout
        samples rewritten, and what was generated."""
        chosen = self.rows(micro_batches, first_position)
        if not chosen:  # this rank has none this step; the others need nothing from it
            return micro_batches, RolloutStats()
        samples = [int(micro_batches[b]["sample_index"][r]) for b, r in chosen]
        prompts = [self.dataset.prompt(index).tolist() for index in samples]
        with eval_mode(model):
            replies = generate(
                model,
                prompts,
                self.sampling,
                vocab_size=self.vocab_size,
                eos_id=self.eos_id,
                # A record may hold seq_length + 1 tokens: the last one is only a label.
                context_length=self.dataset.seq_length + 1,
                row_seeds=[self.row_seed(step, index) for index in samples],
            )
        rewritten = _rewrite(self.dataset, micro_batches, chosen, prompts, replies)
        return rewritten, RolloutStats(
            samples=len(replies),
            reply_tokens=sum(len(reply.tokens) for reply in replies),
            finished=sum(reply.finish == "eos" for reply in replies),
        )


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generation without dropout; the mode the trainer set is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _rewrite(
    dataset: DistillationDataset,
    micro_batches: list[Batch],
    chosen: list[tuple[int, int]],
    prompts: list[list[int]],
    replies: list[Generation],
) -> list[Batch]:
    """New micro-batches in which each chosen row holds prompt + reply."""
    rows = {(b, r): (p, g) for (b, r), p, g in zip(chosen, prompts, replies)}
    rewritten = []
    for index, batch in enumerate(micro_batches):
        samples = []
        for row in range(len(batch["sample_index"])):
            if (index, row) not in rows:
                samples.append({name: batch[name][row] for name in batch})
                continue
            prompt, reply = rows[(index, row)]
            tokens = numpy.asarray(prompt + reply.tokens, dtype=numpy.int64)
            mask = numpy.asarray([0] * len(prompt) + [1] * len(reply.tokens), dtype=numpy.uint8)
            sample = dataset.sample_of([(tokens, mask)])
            sample["sample_index"] = batch["sample_index"][row]
            samples.append(sample)
        rewritten.append(default_collate(samples))
    return rewritten
