"""Teacher replies as off-policy training records (``tools/generate_data.py``).

Each kept reply becomes a record in its prompt's schema, which ``tools/prepare_data.py``
reads: ``{"prompt", "response"}`` or ``{"messages": [..., {"role": "assistant", ...}]}``,
plus the reference ``answer`` when there is one (prepare ignores it). A reply cut off by
``max_new_tokens`` or the context is dropped by default: the chat format ends every reply
with EOS, so training on it would teach the student to stop mid-solution.
"""

from __future__ import annotations

from typing import Any

from hpd_megatron.eval.answers import answers_match, extract_answer
from hpd_megatron.eval.runner import Reply


def training_records(
    replies: list[Reply], only_correct: bool = False, keep_unfinished: bool = False
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records to write, and how many replies were dropped for which reason."""
    records: list[dict[str, Any]] = []
    dropped = {"unfinished": 0, "incorrect": 0}
    for reply in replies:
        record = reply.record
        if reply.generation.finish != "eos" and not keep_unfinished:
            dropped["unfinished"] += 1
            continue
        if only_correct and not answers_match(extract_answer(reply.text), record.reference or ""):
            dropped["incorrect"] += 1
            continue
        if isinstance(record.prompt, str):
            out: dict[str, Any] = {"prompt": record.prompt, "response": reply.text}
        else:
            out = {"messages": [*record.prompt, {"role": "assistant", "content": reply.text}]}
        if record.reference is not None:
            out["answer"] = record.reference
        records.append(out)
    return records, dropped
