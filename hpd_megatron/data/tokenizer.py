"""The student's tokenizer: a SentencePiece model or a Hugging Face ``tokenizer.json``.

    tokenizer = load_tokenizer("checkpoints/student")   # a directory, tokenizer.json or *.model

Both kinds expose the same small surface: ``encode`` (never adds BOS/EOS: the chat format
decides where they go), ``decode``, ``vocab_size``, ``bos_id``/``eos_id``/``pad_id`` (None when
the tokenizer has none), ``chat_template`` (the Jinja template of a Hugging Face tokenizer, or
None) and ``fingerprint()``, a hash of the id -> piece table: two tokenizers with the same
fingerprint map every id to the same string, which is what distillation needs of a teacher
and a student.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpd_megatron.data.files import read_json_object
from hpd_megatron.errors import ConfigError, DataError


class Tokenizer:
    kind: str
    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (not its decoded text)."""
        raise NotImplementedError

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token strings, as chat templates expect to see them."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {name: self.piece(i) for name, i in ids.items() if i is not None}

    def fingerprint(self) -> str:
        pieces = [self.piece(i) for i in range(self.vocab_size)]
        return "sha256:" + hashlib.sha256(json.dumps(pieces).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the data sidecar records about the tokenizer."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "fingerprint": self.fingerprint(),
        }


@dataclass(frozen=True)
class TokenizerIdentity:
    """What one input of a run says about its tokenizer; None where it records nothing
    (a description written by hand has a vocabulary size but no fingerprint)."""

    owner: str
    """Names the input in an error: ``student.model (ckpt/model.yaml)``, ``data.train (...)``."""
    vocab_size: int | None
    fingerprint: str | None


def tokenizer_mismatch(first: TokenizerIdentity, second: TokenizerIdentity) -> str | None:
    """Why two inputs do not share token ids, or None when nothing recorded says so.

    Sizes alone miss the classic mix-up: Llama-2 and Mistral both have 32000 tokens.
    """
    if _known_and_different(first.vocab_size, second.vocab_size):
        return (
            f"{first.owner} has a {first.vocab_size}-token vocabulary but {second.owner} has "
            f"{second.vocab_size}"
        )
    if _known_and_different(first.fingerprint, second.fingerprint):
        return (
            f"{first.owner} has tokenizer fingerprint {first.fingerprint} but {second.owner} "
            f"has {second.fingerprint} (same size, different pieces)"
        )
    return None


def _known_and_different(first: object, second: object) -> bool:
    return first is not None and second is not None and first != second


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise DataError(f"{path}: not a SentencePiece model ({error})") from None
        self.vocab_size = self._sp.get_piece_size()
        # SentencePiece reports a missing special token as -1.
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; special tokens and the chat template come from the
    ``tokenizer_config.json`` (and ``chat_template.jinja``, which wins) next to it."""

    kind = "huggingface"

    def __init__(self, path: Path) -> None:
        import tokenizers

        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({error})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = path.parent / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.exists() else {}
        self.bos_id, self.eos_id, self.pad_id = (
            self._token_id(config, key, config_path)
            for key in ("bos_token", "eos_token", "pad_token")
        )
        template_path = path.parent / "chat_template.jinja"
        if template_path.exists():
            self.chat_template = template_path.read_text()
        else:
            self.chat_template = _config_template(config.get("chat_template"), config_path)

    def _token_id(self, config: dict[str, Any], key: str, config_path: Path) -> int | None:
        token = config.get(key)
        if isinstance(token, dict):  # a serialised AddedToken
            token = token.get("content")
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"{config_path}: {key} {token!r} is not in the vocabulary of {self.path}"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        # Added tokens written in the text (e.g. "<|im_start|>") are still matched.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


def _config_template(value: Any, config_path: Path) -> str | None:
    # Older configs hold a list of named templates; the one named "default" is the chat one.
    if isinstance(value, list):
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{config_path}: chat_template must be a string")
    return value


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``*.model`` (SentencePiece), ``*.json`` (Hugging Face) or a directory holding
    ``tokenizer.json`` or ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise DataError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def train_sentencepiece(
    texts: Iterable[str], model_prefix: str | Path, vocab_size: int, byte_fallback: bool = False
) -> Path:
    """Train a small lossless BPE SentencePiece model on ``texts``; return the ``.model`` path.

    Lossless on the characters it has seen: no normalisation, no dummy leading space, runs of
    spaces kept, and newlines as their own piece (SentencePiece otherwise cannot represent
    them), so ``decode(encode(text)) == text``. Digits are split into single pieces, which
    written arithmetic needs. Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>. ``byte_fallback`` makes
    unseen characters lossless too, at the cost of 256 byte pieces.
    """
    import sentencepiece

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            pad_id=3,
            minloglevel=2,
        )
    except (
        RuntimeError
    ) as error:  # e.g. "Vocabulary size too high (300). Please set it to a value <= 120."
        raise ConfigError(f"vocab_size: {error}") from None
    return model_prefix.with_name(model_prefix.name + ".model")
