"""Off-policy training records from JSONL, checked line by line.

One JSON object per line, either schema (other keys, e.g. an "answer", are ignored):

    {"prompt": "Compute 3 + 4.", "response": "4 + 3 = 7, write 7.\\nThe answer is 7."}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

A prompt/response record becomes the conversation [user: prompt, assistant: response].
Blank lines are skipped. The first bad line stops everything with a ``DataError`` that
names the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hpd_megatron.data.chat import ROLES, Message
from hpd_megatron.data.files import not_utf8
from hpd_megatron.errors import DataError

T = TypeVar("T")
SHOWN_LINES = 10
"""How many line numbers of skipped, truncated or dropped records a message lists."""


def read_records(path: str | Path) -> Iterator[tuple[int, list[Message]]]:
    """Yield (line number, conversation) for every record of a JSONL file."""
    return read_jsonl(path, lambda record, _line: conversation(record), "no such data file")


def read_jsonl(
    path: str | Path, parse: Callable[[Any, int], T], missing: str
) -> Iterator[tuple[int, T]]:
    """Yield (line number, ``parse(object, line number)``) for every non-blank line of a
    JSONL file. Broken JSON, or a ``DataError`` from ``parse``, becomes a ``DataError`` that
    names the file and the line; a missing file is ``PATH: missing``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: {not_utf8(error)}") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            try:
                parsed = parse(value, number)
            except DataError as error:
                raise DataError(f"{path}:{number}: {error}") from None
            yield number, parsed


def shown_lines(lines: Sequence[int]) -> str:
    """The first ``SHOWN_LINES`` line numbers, comma-separated, then "..." if there are more."""
    return ", ".join(map(str, lines[:SHOWN_LINES])) + (", ..." if len(lines) > SHOWN_LINES else "")


def conversation(record: Any) -> list[Message]:
    """The conversation a record holds; DataError (without a location) if it holds none."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record and "prompt" in record:
        raise DataError('record has both "messages" and "prompt"; use one schema')
    if "messages" in record:
        return _messages(record["messages"])
    if "prompt" in record:
        if "response" not in record:
            raise DataError('record has a "prompt" but no "response"')
        for key in ("prompt", "response"):
            if not isinstance(record[key], str):
                raise DataError(f'"{key}" must be a string, got {type(record[key]).__name__}')
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise DataError(
        f'expected {{"prompt", "response"}} or {{"messages"}}, got keys {sorted(record)}'
    )


def checked_messages(messages: Any) -> list[Message]:
    """A ``messages`` list with each role and content checked; DataError names the first bad one."""
    if not isinstance(messages, list):
        raise DataError(f'"messages" must be a list, got {type(messages).__name__}')
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(
                f'messages[{i}]: expected {{"role": ..., "content": "..."}}, got {message!r}'
            )
        if message.get("role") not in ROLES:
            raise DataError(
                f"messages[{i}]: role {message.get('role')!r} is not one of {', '.join(ROLES)}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _messages(messages: Any) -> list[Message]:
    checked = checked_messages(messages)
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError("record has no assistant message (nothing to train on)")
    return checked
