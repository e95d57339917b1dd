"""JSONL records -> Megatron indexed datasets of token ids and loss masks, plus a sidecar.

For ``output_prefix`` P it writes (all or nothing: staged, then renamed, the sidecar last):

    P_tokens.bin / .idx      one sequence and one document per record: its token ids
    P_loss_mask.bin / .idx   same lengths and boundaries, uint8: 1 on assistant-reply tokens
                             (with the EOS or end-of-turn text that closes each reply), else 0
    P.json                   counts, the settings used, the tokenizer's ids and fingerprint,
                             and ``packing``: samples and efficiency (real tokens / slots) at
                             seq_length, packed (data.pack, with seed 0) and padded

A record may hold ``seq_length + 1`` tokens: a training sample feeds ``seq_length`` tokens
and predicts each one's successor, so the last token is only ever a label. Longer records
are truncated to that (``overlong="truncate"``, keeping the prompt and the start of the
reply) or dropped (``"drop"``). A record with no reply token after its first token (which
nothing predicts) trains nothing and is dropped too; both are counted in the sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from hpd_megatron.data.chat import encode_conversation, resolve_chat_template
from hpd_megatron.data.files import check_outputs, staged_files
from hpd_megatron.data.packing import packing_report
from hpd_megatron.data.records import read_records, shown_lines
from hpd_megatron.data.tokenizer import Tokenizer, load_tokenizer
from hpd_megatron.errors import ConfigError, DataError

TOKENS_SUFFIX = "_tokens"
LOSS_MASK_SUFFIX = "_loss_mask"
OVERLONG = ("truncate", "drop")


@dataclass
class Tally:
    """What ``prepare`` kept, truncated and dropped."""

    records: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    dropped_lines: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    """Tokens of each record kept, for the packing report."""

    def counts(self) -> dict[str, int]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "truncated": len(self.truncated_lines),
            "dropped": len(self.dropped_lines),
        }


def prepare(
    input_path: str | Path,
    tokenizer_path: str | Path,
    output_prefix: str | Path,
    seq_length: int,
    overlong: str = "truncate",
    chat_template: str = "auto",
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Tokenize and mask every record of ``input_path``; return the sidecar's contents.

    ``chat_template``: ``auto`` (the tokenizer's template if it has one, else the builtin
    format of ``chat.py``), ``builtin``, or the path of a Jinja template file.
    """
    if seq_length < 1:
        raise ConfigError(f"seq_length: must be >= 1, got {seq_length}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong: expected one of {', '.join(OVERLONG)}, got {overlong!r}")
    input_path, prefix = Path(input_path), str(output_prefix)
    datasets = [prefix + TOKENS_SUFFIX, prefix + LOSS_MASK_SUFFIX]
    outputs = [f"{name}.{kind}" for name in datasets for kind in ("bin", "idx")]
    check_outputs(
        "--output-prefix",
        [*outputs, prefix + ".json"],
        {"--input": input_path, "--tokenizer": tokenizer_path, "--chat-template": chat_template},
    )
    tokenizer = load_tokenizer(tokenizer_path)
    template = resolve_chat_template(tokenizer, chat_template)
    max_tokens = seq_length + 1
    tally = Tally()
    records = encode_records(input_path, tokenizer, template, max_tokens, overlong, tally)
    with staged_files([*outputs, prefix + ".json"]) as (*staged, sidecar_path):
        write_datasets(records, staged, tokenizer.vocab_size, tally)
        check_kept(tally, input_path, max_tokens, overlong)
        sidecar = {
            "input": str(input_path),
            "seq_length": seq_length,
            "max_record_tokens": max_tokens,
            "overlong": overlong,
            "chat_template": ("tokenizer" if template is not None else "builtin")
            if chat_template == "auto"
            else chat_template,
            **tally.counts(),
            "packing": packing_report(numpy.asarray(tally.lengths) - 1, seq_length),
            "tokenizer": tokenizer.describe(),
            "datasets": {
                "tokens": Path(prefix).name + TOKENS_SUFFIX,
                "loss_mask": Path(prefix).name + LOSS_MASK_SUFFIX,
            },
        }
        sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    log_summary(log, input_path, prefix, tally, max_tokens)
    packing = sidecar["packing"]
    log(
        f"efficiency at seq_length {seq_length} (real tokens / slots): packed "
        f"{packing['packed_efficiency']:.1%} in {packing['packed_samples']} samples, padded "
        f"{packing['padded_efficiency']:.1%} in {packing['padded_samples']}"
    )
    return sidecar


def encode_records(
    input_path: Path,
    tokenizer: Tokenizer,
    template: str | None,
    max_tokens: int,
    overlong: str,
    tally: Tally,
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield the token ids and loss mask of every record kept (truncated to ``max_tokens``
    unless ``overlong`` drops it); the lines truncated or dropped go into ``tally``."""
    for line, messages in read_records(input_path):
        try:
            ids, mask = encode_conversation(tokenizer, messages, template)
        except DataError as error:
            raise DataError(f"{input_path}:{line}: {error}") from None
        truncated = len(ids) > max_tokens
        if truncated and overlong == "drop":
            tally.dropped_lines.append(line)
            continue
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if not any(mask[1:]):
            tally.dropped_lines.append(line)
            continue
        if truncated:
            tally.truncated_lines.append(line)
        yield ids, mask


def write_datasets(
    records: Iterable[tuple[list[int], list[int]]],
    paths: Sequence[Path],
    vocab_size: int,
    tally: Tally,
) -> None:
    """The token and loss-mask datasets (``paths``: their .bin, .idx, .bin, .idx), one
    document per record; counts into ``tally``."""
    # Imported here: megatron.core takes seconds to import, and only writing needs it.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokens_bin, tokens_idx, mask_bin, mask_idx = paths
    tokens_out = IndexedDatasetBuilder(str(tokens_bin), dtype=DType.optimal_dtype(vocab_size))
    mask_out = IndexedDatasetBuilder(str(mask_bin), dtype=numpy.uint8)
    for ids, mask in records:
        tokens_out.add_document(ids, [len(ids)])
        mask_out.add_document(mask, [len(mask)])
        tally.records += 1
        tally.lengths.append(len(ids))
        tally.tokens += len(ids)
        tally.response_tokens += sum(mask)
    tokens_out.finalize(str(tokens_idx))
    mask_out.finalize(str(mask_idx))


def check_kept(tally: Tally, input_path: Path, max_tokens: int, overlong: str) -> None:
    """A ``DataError`` when no record was kept, saying why."""
    if tally.records == 0:
        raise DataError(
            f"{input_path}: no records left: all {len(tally.dropped_lines)} were dropped "
            f"(longer than {max_tokens} tokens with overlong={overlong}, or no reply token "
            "within them)"
            if tally.dropped_lines
            else f"{input_path}: no records (the file is empty)"
        )


def log_summary(
    log: Callable[[str], Any], input_path: Path, prefix: str, tally: Tally, max_tokens: int
) -> None:
    """What was written, and which lines were truncated or dropped and why."""
    log(
        f"{input_path}: {tally.records} records, {tally.tokens} tokens "
        f"({tally.response_tokens} in responses) -> "
        f"{prefix}{{{TOKENS_SUFFIX},{LOSS_MASK_SUFFIX}}}.bin/.idx, {prefix}.json"
    )
    reasons = {
        "truncated": f"longer than {max_tokens} tokens",
        "dropped": f"longer than {max_tokens} tokens with overlong=drop, "
        "or no reply token within them",
    }
    for what, lines in (("truncated", tally.truncated_lines), ("dropped", tally.dropped_lines)):
        if lines:
            log(f"{what} {len(lines)} records ({reasons[what]}): lines {shown_lines(lines)}")
