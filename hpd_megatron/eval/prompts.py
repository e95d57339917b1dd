"""Evaluation prompts from JSONL, checked line by line, encoded as training encoded them.

One JSON object per line (blank lines are skipped), in either training schema:

    {"prompt": "Compute 3 + 4.", "answer": 7}
    {"prompt": "...", "response": "... The answer is 7."}        # the answer is extracted
    {"messages": [{"role": "user", "content": "..."}, ...], "answer": "7"}

A final assistant message in ``messages`` is the reference reply (not part of the prompt).
The reference answer is ``answer`` (a string or number), else what ``extract_answer``
finds in the reference reply. The first bad line stops everything with a ``DataError``
naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpd_megatron.data.chat import Message, encode_prompt
from hpd_megatron.data.records import checked_messages, read_jsonl, shown_lines
from hpd_megatron.data.tokenizer import Tokenizer
from hpd_megatron.errors import DataError
from hpd_megatron.eval.answers import extract_answer


@dataclass
class EvalRecord:
    line: int
    prompt: str | list[Message]
    """As written in the file: the prompt string or the messages before the reply."""
    messages: list[Message]
    """The conversation the reply continues."""
    reference: str | None
    """The reference answer (None when the record gives none)."""
    path: str = ""
    """The file it was read from."""
    benchmark: str | None = None
    """Its benchmark (``eval/benchmarks.py``); None: the job's one file."""
    samples: int | None = None
    """Replies to generate for it (its benchmark's k); None: the job's ``samples``."""


def read_eval_records(
    path: str | Path, require_answer: bool = True, allow_empty: bool = False
) -> list[EvalRecord]:
    """Every record of an evaluation JSONL file; ``require_answer``: each needs a reference;
    ``allow_empty``: no records is an empty list, not an error."""
    records = []
    for number, record in read_jsonl(path, eval_record, "no such evaluation file"):
        record.path = str(path)
        if require_answer and record.reference is None:
            raise DataError(
                f'{path}:{number}: no reference answer (give "answer", or a reply '
                "whose answer can be extracted)"
            )
        records.append(record)
    if not records and not allow_empty:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def eval_record(raw: Any, line: int) -> EvalRecord:
    """One record (a parsed JSON object, or a parquet row's prompt and answer)."""
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}")
    if ("prompt" in raw) == ("messages" in raw):
        raise DataError(f'expected exactly one of "prompt" or "messages", got keys {sorted(raw)}')
    reply = raw.get("response")
    if "prompt" in raw:
        if not isinstance(raw["prompt"], str):
            raise DataError(f'"prompt" must be a string, got {type(raw["prompt"]).__name__}')
        prompt: str | list[Message] = raw["prompt"]
        messages = [{"role": "user", "content": raw["prompt"]}]
    else:
        messages = _messages(raw["messages"])
        if messages[-1]["role"] == "assistant":
            reply = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(
                '"messages" must end with a user message '
                "(or a user message and the reference reply)"
            )
        prompt = messages
    if reply is not None and not isinstance(reply, str):
        raise DataError(f'"response" must be a string, got {type(reply).__name__}')
    answer = raw.get("answer")
    if answer is not None and (
        isinstance(answer, bool) or not isinstance(answer, (str, int, float))
    ):
        raise DataError(f'"answer" must be a string or a number, got {answer!r}')
    reference = str(answer) if answer is not None else (extract_answer(reply) if reply else None)
    return EvalRecord(line, prompt, messages, reference)


def _messages(value: Any) -> list[Message]:
    if value == []:
        raise DataError('"messages" must be a non-empty list')
    return checked_messages(value)


def encode_prompts(
    records: list[EvalRecord], tokenizer: Tokenizer, template: str | None, context_length: int
) -> tuple[list[tuple[EvalRecord, list[int]]], list[EvalRecord]]:
    """(record, prompt ids) of every prompt that leaves room for a reply, and the records
    that do not (``context_length`` tokens or more), which are skipped. The prompt is
    encoded exactly as ``prepare_data`` encodes what precedes a reply."""
    kept, skipped = [], []
    for record in records:
        try:
            ids = encode_prompt(tokenizer, record.messages, template)
        except DataError as error:  # a chat template that fails on this record
            raise DataError(f"{record.path}:{record.line}: {error}") from None
        if len(ids) >= context_length:
            skipped.append(record)
        else:
            kept.append((record, ids))
    return kept, skipped


def describe_skipped(skipped: list[EvalRecord], context_length: int) -> str:
    """One line: how many prompts of each file were skipped, why, and their first lines
    (rows of a parquet file)."""
    by_path: dict[str, list[int]] = {}
    for record in skipped:
        by_path.setdefault(record.path, []).append(record.line)
    return "; ".join(
        f"{path}: skipped {len(lines)} prompt(s) of {context_length} tokens or more "
        f"(no room for a reply in the context of {context_length}): "
        f"{'rows' if path.endswith('.parquet') else 'lines'} {shown_lines(lines)}"
        for path, lines in by_path.items()
    )
