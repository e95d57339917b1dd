"""What a model is, independent of how it is parallelised.

A ``ModelDescription`` holds the architecture fields that Hugging Face configs and
Megatron's TransformerConfig both know about. The converters write one next to each
checkpoint and the trainer reads it; ``builder.py`` turns it into a GPTModel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpd_megatron.config import ConfigError, from_dict, load_yaml

# The families differ only in which optional pieces their attention uses; everything
# else (RMSNorm, SwiGLU, RoPE, no linear biases) is shared.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": False, "qk_layernorm": False},
    "mistral": {"qkv_bias": False, "qk_layernorm": False},
    "qwen2": {"qkv_bias": True, "qk_layernorm": False},
    "qwen3": {"qkv_bias": False, "qk_layernorm": True},
}
SUPPORTED_ROPE_SCALING = ("llama3",)
POSITIVE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "vocab_size",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
)


@dataclass
class RopeScaling:
    """Llama-3.1-style frequency scaling of rotary embeddings."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelDescription:
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    """The tokenizer's (real) vocabulary; the output layer is padded beyond it."""
    num_query_groups: int | None = None
    """KV heads for grouped-query attention; None means one per attention head."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None
    """None takes the family's default (True for qwen2)."""
    qk_layernorm: bool | None = None
    """None takes the family's default (True for qwen3)."""
    init_method_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields a converter keeps for the way back (e.g. Hugging Face's model_type)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DEFAULTS:
            raise ConfigError(
                f"model.family: unsupported family {self.family!r} "
                f"(supported: {', '.join(FAMILY_DEFAULTS)})"
            )
        for name, default in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        # Before anything divides by them (a zero would be a ZeroDivisionError).
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {value}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.kv_channels: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set kv_channels"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups: {self.num_query_groups} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.rope_scaling is not None and self.rope_scaling.type not in SUPPORTED_ROPE_SCALING:
            raise ConfigError(
                f"model.rope_scaling.type: unsupported {self.rope_scaling.type!r} "
                f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})"
            )

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelDescription:
        return from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelDescription:
        data = load_yaml(path)
        try:
            return from_dict(cls, data, "model")
        except ConfigError as error:  # name the file as well as the key
            raise ConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
