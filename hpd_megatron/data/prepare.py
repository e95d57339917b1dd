"""JSONL records -> Megatron indexed datasets of token ids and loss masks, plus a sidecar.

For ``output_prefix`` P it writes (all or nothing: staged, then renamed, the sidecar last):

    P_tokens.bin / .idx      one sequence and one document per record: its token ids
    P_loss_mask.bin / .idx   same lengths and boundaries, uint8: 1 on assistant-reply tokens
                             (with the EOS or end-of-turn text that closes each reply), else 0
    P.json                   counts, the settings used, and the tokenizer's ids and fingerprint

A record may hold ``seq_length + 1`` tokens: a training sample feeds ``seq_length`` tokens
and predicts each one's successor, so the last token is only ever a label. Longer records
are truncated to that (``overlong="truncate"``, keeping the prompt and the start of the
reply) or dropped (``"drop"``). A record with no reply token after its first token (which
nothing predicts) trains nothing and is dropped too; both are counted in the sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy

from hpd_megatron.data.chat import encode_conversation, resolve_chat_template
from hpd_megatron.data.files import DataError, staged_files
from hpd_megatron.data.records import read_records
from hpd_megatron.data.tokenizer import load_tokenizer
from hpd_megatron.errors import ConfigError

TOKENS_SUFFIX = "_tokens"
LOSS_MASK_SUFFIX = "_loss_mask"
OVERLONG = ("truncate", "drop")
SHOWN_LINES = 10
"""How many line numbers of truncated / dropped records the summary lists."""


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
    # Imported here: megatron.core takes seconds to import, and only writing needs it.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if seq_length < 1:
        raise ConfigError(f"seq_length: must be >= 1, got {seq_length}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong: expected one of {', '.join(OVERLONG)}, got {overlong!r}")
    tokenizer = load_tokenizer(tokenizer_path)
    template = resolve_chat_template(tokenizer, chat_template)
    input_path, prefix = Path(input_path), str(output_prefix)
    max_tokens = seq_length + 1
    counts = {"records": 0, "tokens": 0, "response_tokens": 0, "truncated": 0, "dropped": 0}
    truncated_lines: list[int] = []
    dropped_lines: list[int] = []

    outputs = [
        prefix + TOKENS_SUFFIX + ".bin",
        prefix + TOKENS_SUFFIX + ".idx",
        prefix + LOSS_MASK_SUFFIX + ".bin",
        prefix + LOSS_MASK_SUFFIX + ".idx",
        prefix + ".json",
    ]
    with staged_files(outputs) as (tokens_bin, tokens_idx, mask_bin, mask_idx, sidecar_path):
        tokens_out = IndexedDatasetBuilder(
            str(tokens_bin), dtype=DType.optimal_dtype(tokenizer.vocab_size)
        )
        mask_out = IndexedDatasetBuilder(str(mask_bin), dtype=numpy.uint8)
        for line, messages in read_records(input_path):
            try:
                ids, mask = encode_conversation(tokenizer, messages, template)
            except DataError as error:
                raise DataError(f"{input_path}:{line}: {error}") from None
            truncated = len(ids) > max_tokens
            if truncated and overlong == "drop":
                dropped_lines.append(line)
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            if not any(mask[1:]):
                dropped_lines.append(line)
                continue
            if truncated:
                truncated_lines.append(line)
            tokens_out.add_document(ids, [len(ids)])
            mask_out.add_document(mask, [len(mask)])
            counts["records"] += 1
            counts["tokens"] += len(ids)
            counts["response_tokens"] += sum(mask)
        counts["truncated"], counts["dropped"] = len(truncated_lines), len(dropped_lines)
        if counts["records"] == 0:
            raise DataError(
                f"{input_path}: no records left: all {counts['dropped']} were dropped (longer than "
                f"{max_tokens} tokens with overlong={overlong}, or no reply token within them)"
                if counts["dropped"]
                else f"{input_path}: no records (the file is empty)"
            )
        tokens_out.finalize(str(tokens_idx))
        mask_out.finalize(str(mask_idx))
        sidecar = {
            "input": str(input_path),
            "seq_length": seq_length,
            "max_record_tokens": max_tokens,
            "overlong": overlong,
            "chat_template": ("tokenizer" if template is not None else "builtin")
            if chat_template == "auto"
            else chat_template,
            **counts,
            "tokenizer": tokenizer.describe(),
            "datasets": {
                "tokens": Path(prefix).name + TOKENS_SUFFIX,
                "loss_mask": Path(prefix).name + LOSS_MASK_SUFFIX,
            },
        }
        sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")

    log(
        f"{input_path}: {counts['records']} records, {counts['tokens']} tokens "
        f"({counts['response_tokens']} in responses) -> {prefix}{{{TOKENS_SUFFIX},{LOSS_MASK_SUFFIX}}}.bin/.idx, {prefix}.json"
    )
    reasons = {
        "truncated": f"longer than {max_tokens} tokens",
        "dropped": f"longer than {max_tokens} tokens with overlong=drop, or no reply token within them",
    }
    for what, lines in (("truncated", truncated_lines), ("dropped", dropped_lines)):
        if lines:
            shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (
                ", ..." if len(lines) > SHOWN_LINES else ""
            )
            log(f"{what} {len(lines)} records ({reasons[what]}): lines {shown}")
    return sidecar
