"""Conversations -> token ids plus the mask of the tokens the model is trained on.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. It is
cut into segments (the text before an assistant reply, the reply itself, ...) and each
segment is encoded on its own. That is exactly how the model meets the text when it
generates: the prompt is encoded up to the point where the reply starts, and the reply
tokens follow. Encoding the whole string at once could merge a token across the boundary,
and then no token would be "the first token of the reply".

Two formats:

- A Jinja chat template (a Hugging Face tokenizer's own, or a file), rendered the way
  transformers renders it. The reply segment of assistant message i is what rendering
  ``messages[:i+1]`` adds to rendering ``messages[:i]`` with the generation prompt, so it
  holds the content and the template's end-of-turn text (for ChatML: ``...<|im_end|>\\n``).
  A template that rewrites earlier turns once later ones follow (e.g. one that strips
  earlier reasoning) cannot be masked this way and is refused.
- ``builtin``, for tokenizers without a template (SentencePiece, base models)::

      <bos>System: {content}\\n
      User: {content}\\n
      Assistant:\\n{content}<eos>User: ...

  BOS only when the tokenizer has one; EOS (an id, never text) ends every reply and is part
  of it. The generation prompt is ``Assistant:\\n``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hpd_megatron.data.tokenizer import Tokenizer
from hpd_megatron.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
Segment = tuple[list[int], bool]
"""Token ids and whether they belong to an assistant reply."""
GENERATION_PROMPT = "Assistant:\n"
"""What the builtin format writes before every assistant reply."""


def resolve_chat_template(tokenizer: Tokenizer, option: str) -> str | None:
    """``auto``: the tokenizer's template, else builtin; ``builtin``: None; else a Jinja file.

    The template (None: builtin) is what ``encode_conversation`` and ``encode_prompt`` take;
    it is checked here, so that a broken one is reported once, naming its file.
    """
    if option in ("auto", "builtin"):
        template = tokenizer.chat_template if option == "auto" else None
        source = tokenizer.path
        if template is None and tokenizer.eos_id is None:
            raise DataError(
                f"{source}: the builtin chat format ends replies with EOS, "
                "and this tokenizer has none"
            )
    else:
        source = Path(option)
        if not source.is_file():
            raise DataError(
                f"{source}: no such chat template file (expected auto, builtin or a Jinja file)"
            )
        template = source.read_text()
    if template is not None:
        try:
            _compile(template)
        except DataError as error:
            raise DataError(f"{source}: {error}") from None
    return template


def encode_conversation(
    tokenizer: Tokenizer, messages: list[Message], template: str | None
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask that is 1 on assistant replies."""
    ids: list[int] = []
    mask: list[int] = []
    for segment, is_reply in _segments(tokenizer, messages, template, add_generation_prompt=False):
        ids += segment
        mask += [int(is_reply)] * len(segment)
    return ids, mask


def encode_prompt(tokenizer: Tokenizer, messages: list[Message], template: str | None) -> list[int]:
    """Ids that ask for the next assistant reply: the same ids that precede a reply in
    ``encode_conversation``, so generation sees what training saw."""
    segments = _segments(tokenizer, messages, template, add_generation_prompt=True)
    return [i for segment, _ in segments for i in segment]


def _segments(
    tokenizer: Tokenizer, messages: list[Message], template: str | None, add_generation_prompt: bool
) -> list[Segment]:
    if template is None:
        return _builtin_segments(tokenizer, messages, add_generation_prompt)
    return _template_segments(tokenizer, messages, template, add_generation_prompt)


def _builtin_segments(
    tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool
) -> list[Segment]:
    segments: list[Segment] = []
    prompt_ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    text = ""
    for message in messages:
        if message["role"] == "assistant":
            segments.append((prompt_ids + tokenizer.encode(text + GENERATION_PROMPT), False))
            segments.append((tokenizer.encode(message["content"]) + [tokenizer.eos_id], True))
            prompt_ids, text = [], ""
        else:
            text += _builtin_turn(message)
    if add_generation_prompt:
        text += GENERATION_PROMPT
    if prompt_ids or text:
        segments.append((prompt_ids + tokenizer.encode(text), False))
    return segments


def builtin_text(messages: list[Message]) -> str:
    """The text of the builtin format without BOS/EOS: what a tokenizer trained for it must
    cover."""
    return "".join(
        GENERATION_PROMPT + m["content"] if m["role"] == "assistant" else _builtin_turn(m)
        for m in messages
    )


def _builtin_turn(message: Message) -> str:
    return f"{message['role'].capitalize()}: {message['content']}\n"


def _template_segments(
    tokenizer: Tokenizer, messages: list[Message], template: str, add_generation_prompt: bool
) -> list[Segment]:
    def render(upto: int, generation_prompt: bool) -> str:
        return _render(template, messages[:upto], generation_prompt, tokenizer.special_tokens())

    segments: list[Segment] = []
    done = ""  # the rendered text already cut into segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                f"message {i}: the chat template renders the conversation before this reply "
                "differently once the reply follows, so the reply's tokens cannot be told apart"
            )
        segments.append((tokenizer.encode(prompt[len(done) :]), False))
        segments.append((tokenizer.encode(full[len(prompt) :]), True))
        done = full
    rest = render(len(messages), add_generation_prompt)
    if not rest.startswith(done):
        raise DataError(
            "the chat template renders earlier replies differently once later messages follow"
        )
    if len(rest) > len(done):
        segments.append((tokenizer.encode(rest[len(done) :]), False))
    return segments


def _render(
    template: str, messages: list[Message], add_generation_prompt: bool, special: dict[str, str]
) -> str:
    import jinja2

    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **special,
        )
    except jinja2.TemplateError as error:
        raise DataError(f"the chat template failed: {error}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    # The environment transformers gives chat templates: sandboxed, trim_blocks and
    # lstrip_blocks, loop controls, a tojson that does not escape HTML, raise_exception and
    # strftime_now. ({% generation %} blocks are not supported; the masks come from renders.)
    import datetime
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(
            f"the chat template is not valid Jinja (template line {error.lineno}: {error.message})"
        ) from None
