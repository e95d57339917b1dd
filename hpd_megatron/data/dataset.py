"""Fixed-length training samples from the indexed datasets that ``prepare.py`` writes.

A record of L tokens x with loss mask m gives L - 1 positions: position t feeds x[t] and is
labelled x[t+1], or IGNORE_INDEX (-100) where m[t+1] is 0. Its last token is only a label,
so no position ever predicts a token of another record.

- Padding (``pack=False``): one record per sample, then pad tokens (labels -100) up to
  ``seq_length``.
- Packing (``pack=True``): consecutive records, in file order, fill a sample while their
  positions fit (next-fit), then padding. The label shift is done per record, so the masks
  at the boundaries are the same as padding would give; ``position_ids`` restart at 0 for
  every record (and for the padding). Attention is NOT separated: with the usual causal mask
  a record sees the records before it in its sample.

The set of samples is fixed when the dataset is opened; the sampler shuffles their order.
Each sample is a dict of tensors of length ``seq_length``: ``tokens``, ``labels`` (int64),
``loss_mask`` (float32, 1 where labels != -100) and ``position_ids`` (int64).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from torch.utils.data import Dataset, default_collate

from hpd_megatron.data.files import read_json_object
from hpd_megatron.data.prepare import LOSS_MASK_SUFFIX, TOKENS_SUFFIX
from hpd_megatron.errors import ConfigError, DataError
from hpd_megatron.losses import IGNORE_INDEX


class DistillationDataset(Dataset):
    def __init__(self, prefix: str | Path, seq_length: int, pack: bool = False) -> None:
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
        # Sample i holds records starts[i] .. starts[i+1]-1.
        self.starts = _pack(lengths - 1, seq_length) if pack else numpy.arange(len(lengths) + 1)
        # Any id would do for padding (padded positions have no label); pad, else EOS, else 0.
        tokenizer = self.meta.get("tokenizer", {})
        pad = tokenizer.get("pad_id")
        self.pad_id: int = pad if pad is not None else tokenizer.get("eos_id") or 0

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = numpy.full(self.seq_length, self.pad_id, dtype=numpy.int64)
        labels = numpy.full(self.seq_length, IGNORE_INDEX, dtype=numpy.int64)
        positions = numpy.zeros(self.seq_length, dtype=numpy.int64)
        start = 0
        for record in range(self.starts[index], self.starts[index + 1]):
            x = self.tokens[record].astype(numpy.int64)
            m = self.loss_mask[record]
            end = start + len(x) - 1
            tokens[start:end] = x[:-1]
            labels[start:end] = numpy.where(m[1:] == 1, x[1:], IGNORE_INDEX)
            positions[start:end] = numpy.arange(end - start)
            start = end
        positions[start:] = numpy.arange(self.seq_length - start)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(numpy.float32)),
            "position_ids": torch.from_numpy(positions),
        }

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The samples at ``indices`` stacked into [len(indices), seq_length] tensors."""
        return default_collate([self[i] for i in indices])


def _pack(positions: numpy.ndarray, capacity: int) -> numpy.ndarray:
    """Next-fit: start offsets of runs of consecutive records whose positions fit ``capacity``."""
    starts = [0]
    used = 0
    for record, size in enumerate(positions.tolist()):
        if used + size > capacity:
            starts.append(record)
            used = 0
        used += size
    starts.append(len(positions))
    return numpy.asarray(starts)


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (write the dataset with tools/prepare_data.py)")
    return read_json_object(path)
