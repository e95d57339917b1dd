"""Fixed-length training samples from the indexed datasets that ``prepare.py`` writes.

A record of L tokens x with loss mask m gives L - 1 positions: position t feeds x[t] and is
labelled x[t+1], or IGNORE_INDEX (-100) where m[t+1] is 0. Its last token is only a label,
so no position ever predicts a token of another record.

- Padding (``pack=False``): one record per sample, then pad tokens (labels -100) up to
  ``seq_length``.
- Packing (``pack=True``): several records per sample, chosen by best-fit decreasing within
  seeded windows (``packing.py``), then padding. The label shift is done per record, so the
  masks at the boundaries are the same as padding would give; ``position_ids`` restart at 0
  for every record (and for the padding). A packed sample also carries ``segment_ids``:
  record k of the sample is segment k, the padding the segment after the last record. The
  model keeps segments apart (``schedule.causal_lm_forward``): a block-diagonal causal mask
  on the local spec, THD attention with ``cu_seqlens`` on Transformer Engine.

The set of samples is fixed when the dataset is opened (from the data and the seed); the
sampler shuffles their order. Each sample is a dict of tensors of length ``seq_length``:
``tokens``, ``labels`` (int64), ``loss_mask`` (float32, 1 where labels != -100),
``position_ids`` (int64) and, packed, ``segment_ids`` (int64).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from torch.utils.data import Dataset, default_collate

from hpd_megatron.data.files import read_json_object
from hpd_megatron.data.packing import best_fit_decreasing, efficiency
from hpd_megatron.data.prepare import LOSS_MASK_SUFFIX, TOKENS_SUFFIX
from hpd_megatron.errors import ConfigError, DataError
from hpd_megatron.losses import IGNORE_INDEX


class DistillationDataset(Dataset):
    def __init__(
        self, prefix: str | Path, seq_length: int, pack: bool = False, seed: int = 0
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if seq_length < 1:
            raise ConfigError(f"data.seq_length: must be >= 1, got {seq_length}")
        self.prefix, self.seq_length, self.pack = str(prefix), seq_length, pack
        self.meta: dict[str, Any] = _read_sidecar(Path(self.prefix + ".json"))
        for suffix in (TOKENS_SUFFIX, LOSS_MASK_SUFFIX):
            if not IndexedDataset.exists(self.prefix + suffix):
                raise DataError(f"{self.prefix}{suffix}.bin/.idx: missing (prepare the data again)")
        self.tokens = IndexedDataset(self.prefix + TOKENS_SUFFIX)
        self.loss_mask = IndexedDataset(self.prefix + LOSS_MASK_SUFFIX)
        lengths = self.tokens.sequence_lengths
        if not numpy.array_equal(lengths, self.loss_mask.sequence_lengths):
            raise DataError(
                f"{self.prefix}: the token and loss-mask datasets have different records"
            )
        too_long = numpy.flatnonzero(lengths > seq_length + 1)
        if len(too_long):
            record = int(too_long[0])
            raise DataError(
                f"{self.prefix}: record {record} has {lengths[record]} tokens, more than "
                f"data.seq_length + 1 = {seq_length + 1} (prepared with --seq-length "
                f"{self.meta.get('seq_length')}); prepare it again with --seq-length {seq_length}"
            )
        # Sample i holds records records[offsets[i]:offsets[i+1]], in that order.
        self.positions = lengths.astype(numpy.int64) - 1
        if pack:
            samples = best_fit_decreasing(self.positions, seq_length, seed)
            self.records = numpy.concatenate([numpy.asarray(s) for s in samples])
            self.offsets = numpy.cumsum([0] + [len(s) for s in samples])
        else:
            self.records = numpy.arange(len(lengths))
            self.offsets = numpy.arange(len(lengths) + 1)
        # Any id would do for padding (padded positions have no label); pad, else EOS, else 0.
        tokenizer = self.meta.get("tokenizer", {})
        pad = tokenizer.get("pad_id")
        self.pad_id: int = pad if pad is not None else tokenizer.get("eos_id") or 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def efficiency(self) -> float:
        """Real positions over slots (samples x seq_length)."""
        return efficiency(self.positions, len(self), self.seq_length)

    def describe(self) -> str:
        """One line for the start-up log: how well the records fill the samples."""
        how = "packed (best-fit decreasing)" if self.pack else "padded, one record each"
        return (
            f"data: {len(self.positions)} records in {len(self)} samples of "
            f"{self.seq_length} positions, {how}: efficiency {self.efficiency:.1%} "
            "(real tokens / slots)"
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        records = self.records[self.offsets[index] : self.offsets[index + 1]]
        return self.sample_of([(self.tokens[r], self.loss_mask[r]) for r in records])

    def prompt(self, index: int) -> numpy.ndarray:
        """An unpacked sample's record up to its first supervised token: what a rollout
        continues (``training/rollout.py``)."""
        record = self.records[self.offsets[index]]
        return self.tokens[record][: int(numpy.argmax(self.loss_mask[record] == 1))]

    def sample_of(
        self, records: Sequence[tuple[numpy.ndarray, numpy.ndarray]]
    ) -> dict[str, torch.Tensor]:
        """The sample holding ``records``, each (token ids, loss mask), in order."""
        tokens = numpy.full(self.seq_length, self.pad_id, dtype=numpy.int64)
        labels = numpy.full(self.seq_length, IGNORE_INDEX, dtype=numpy.int64)
        positions = numpy.zeros(self.seq_length, dtype=numpy.int64)
        segments = numpy.zeros(self.seq_length, dtype=numpy.int64)
        start = 0
        for segment, (ids, m) in enumerate(records):
            x = numpy.asarray(ids).astype(numpy.int64)
            end = start + len(x) - 1
            tokens[start:end] = x[:-1]
            labels[start:end] = numpy.where(m[1:] == 1, x[1:], IGNORE_INDEX)
            positions[start:end] = numpy.arange(end - start)
            segments[start:end] = segment
            start = end
        positions[start:] = numpy.arange(self.seq_length - start)
        segments[start:] = len(records)
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(numpy.float32)),
            "position_ids": torch.from_numpy(positions),
        }
        if self.pack:  # unpacked samples stay as they were: one record, plain causal attention
            sample["segment_ids"] = torch.from_numpy(segments)
        return sample

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The samples at ``indices`` stacked into [len(indices), seq_length] tensors."""
        return default_collate([self[i] for i in indices])


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (write the dataset with tools/prepare_data.py)")
    return read_json_object(path)
