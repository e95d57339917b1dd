"""Hugging Face config.json <-> ModelDescription.

Only the fields Megatron's GPTModel reproduces exactly are accepted; anything it would
silently compute differently (another activation, an output-projection bias, sliding
windows on every layer, an unknown RoPE scaling) is an error naming the key. Fields
Megatron does not need but the way back does (model_type, architectures, the number of
embedding rows, dtype, special token ids) travel in ``ModelDescription.extra``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpd_megatron.data.files import read_json_object
from hpd_megatron.errors import ConversionError
from hpd_megatron.models.description import ModelDescription, RopeScaling
from hpd_megatron.models.dtypes import DTYPES, HF_DTYPE_NAMES

# family -> the Hugging Face class that holds it (config.json's "architectures").
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
HF_DTYPES: dict[str, torch.dtype] = {name: DTYPES[ours] for name, ours in HF_DTYPE_NAMES.items()}
"""config.json's dtype names -> torch dtypes."""
DEFAULT_ROPE_THETA = 10000.0


def supported_architectures() -> str:
    return ", ".join(f"{arch} (model_type {family})" for family, arch in ARCHITECTURES.items())


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    return read_json_object(inside_model_dir(hf_dir, path), ConversionError)


def inside_model_dir(hf_dir: str | Path, path: Path) -> Path:
    """``path``, refused unless it (after following symlinks) lies inside ``hf_dir``: an
    index entry or side file must not make the converter read, or copy into its output,
    a file from elsewhere."""
    root = Path(hf_dir).resolve()
    if not path.resolve().is_relative_to(root):
        raise ConversionError(f"{path}: points outside the model directory {root}")
    return path


def detect_family(config: dict[str, Any], where: str = "config.json") -> str:
    """The family from model_type, checked against architectures when both are given."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    by_architecture = {arch: family for family, arch in ARCHITECTURES.items()}
    family = model_type if model_type in ARCHITECTURES else None
    if family is None:
        family = next((by_architecture[a] for a in architectures if a in by_architecture), None)
    if family is None or any(a not in by_architecture for a in architectures):
        shown = ", ".join(architectures) or "none"
        raise ConversionError(
            f"{where}: unsupported architecture {shown} (model_type {model_type!r}); "
            f"supported: {supported_architectures()}"
        )
    return family


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The checkpoint's dtype as config.json records it (``dtype`` or the older ``torch_dtype``)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return HF_DTYPES.get(name) if isinstance(name, str) else None


def hf_dtype_name(dtype: torch.dtype) -> str:
    """config.json's name of ``dtype`` (``bfloat16`` for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")


def _rope(config: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes rope_parameters (theta included); older configs have
    # rope_theta plus an optional rope_scaling whose kind is "rope_type" or "type".
    parameters = config.get("rope_parameters")
    if (
        isinstance(parameters, dict)
        and "rope_theta" not in parameters
        and all(isinstance(v, dict) for v in parameters.values())
    ):
        raise ConversionError(f"{where}: rope_parameters per layer type are not supported")
    if not isinstance(parameters, dict):
        parameters = dict(config.get("rope_scaling") or {})
    theta = float(parameters.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if (
        float(parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        != 1.0
    ):
        raise ConversionError(f"{where}: partial_rotary_factor != 1 is not supported")
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConversionError(
            f"{where}: rope scaling type {kind!r} is not supported (supported: default, llama3)"
        )
    defaults = RopeScaling()
    return theta, RopeScaling(
        type="llama3",
        factor=float(parameters.get("factor", defaults.factor)),
        low_freq_factor=float(parameters.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(parameters.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            parameters.get(
                "original_max_position_embeddings", defaults.original_max_position_embeddings
            )
        ),
    )


def _require(config: dict[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise ConversionError(f"{where}: missing {key}")
    return config[key]


def _integer(config: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    """``config[key]`` as a JSON integer (``default`` when absent or null; required when no
    default): int() would silently truncate 1.5 or accept "12"."""
    value = _require(config, key, where) if default is None else config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"{where}: {key} must be an integer, got {value!r}")
    return value


# config.json flags that would make the model differ from what Megatron computes.
UNSUPPORTED_FLAGS = {
    "attention_bias": "attention_bias=true (a bias on the output projection) is not supported",
    "mlp_bias": "mlp_bias=true is not supported",
    "use_sliding_window": "use_sliding_window=true is not supported "
    "(Megatron attends to the full context)",
}


def _check_supported(config: dict[str, Any], where: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"{where}: hidden_act {config['hidden_act']!r} is not supported (only silu)"
        )
    for key, problem in UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise ConversionError(f"{where}: {problem}")
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ConversionError(f"{where}: layer_types other than full_attention are not supported")


def description_from_hf(
    config: dict[str, Any], tokenizer_vocab_size: int | None = None, where: str = "config.json"
) -> ModelDescription:
    """The ModelDescription of a Hugging Face config.

    ``vocab_size`` is the tokenizer's vocabulary when one is known (configs often have
    more embedding rows than tokens); the config's row count is kept in
    ``extra["hf_vocab_size"]``.
    """
    family = detect_family(config, where)
    _check_supported(config, where)
    try:
        return _description(config, family, tokenizer_vocab_size, where)
    except ConversionError:
        raise
    except (TypeError, ValueError) as error:
        # A value of the wrong type, or one ModelDescription refuses (ConfigError).
        raise ConversionError(f"{where}: {error}") from None


def _description(
    config: dict[str, Any], family: str, tokenizer_vocab_size: int | None, where: str
) -> ModelDescription:
    heads = _integer(config, "num_attention_heads", where)
    hidden = _integer(config, "hidden_size", where)
    rows = _integer(config, "vocab_size", where)
    theta, scaling = _rope(config, where)
    return ModelDescription(
        family=family,
        num_layers=_integer(config, "num_hidden_layers", where),
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=_integer(config, "intermediate_size", where),
        vocab_size=int(tokenizer_vocab_size or rows),
        num_query_groups=_integer(config, "num_key_value_heads", where, heads),
        kv_channels=_integer(config, "head_dim", where, hidden // heads if heads > 0 else 0),
        max_position_embeddings=_integer(config, "max_position_embeddings", where, 4096),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        extra=_extra(config, family, rows),
    )


def _extra(config: dict[str, Any], family: str, rows: int) -> dict[str, Any]:
    """What the way back needs and Megatron does not (``ModelDescription.extra``)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    extra: dict[str, Any] = {
        "hf_model_type": config.get("model_type", family),
        "hf_architectures": list(config.get("architectures") or [ARCHITECTURES[family]]),
        "hf_vocab_size": rows,
        "hf_dtype": dtype if isinstance(dtype, str) else None,
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }
    if family == "mistral":
        extra["sliding_window"] = config.get("sliding_window")
    return extra


def hf_config_from_description(description: ModelDescription) -> dict[str, Any]:
    """A config.json for a description that came without one.

    RoPE is written the older way (rope_theta + rope_scaling), which every transformers
    version reads; ``extra`` restores what the description alone cannot know.
    """
    extra = description.extra or {}
    family = description.family
    config: dict[str, Any] = {
        "architectures": list(extra.get("hf_architectures") or [ARCHITECTURES[family]]),
        "model_type": extra.get("hf_model_type", family),
        "hidden_size": description.hidden_size,
        "intermediate_size": description.ffn_hidden_size,
        "num_hidden_layers": description.num_layers,
        "num_attention_heads": description.num_attention_heads,
        "num_key_value_heads": description.num_query_groups,
        "vocab_size": int(extra.get("hf_vocab_size") or description.vocab_size),
        "max_position_embeddings": description.max_position_embeddings,
        "rms_norm_eps": description.norm_epsilon,
        "tie_word_embeddings": description.tie_word_embeddings,
        "hidden_act": "silu",
        "rope_theta": description.rotary_base,
        "rope_scaling": None,
        "bos_token_id": extra.get("bos_token_id"),
        "eos_token_id": extra.get("eos_token_id"),
        "torch_dtype": extra.get("hf_dtype") or "float32",
    }
    if (
        family != "qwen2"
        or description.kv_channels * description.num_attention_heads != description.hidden_size
    ):
        config["head_dim"] = description.kv_channels  # Qwen2's config class has no head_dim
    if description.rope_scaling is not None:
        scaling = description.rope_scaling
        config["rope_scaling"] = {
            "rope_type": scaling.type,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    config.update(_family_fields(family, extra))
    return config


def _family_fields(family: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The fields only some families' config classes have."""
    fields: dict[str, Any] = {}
    if family in ("llama", "mistral", "qwen3"):
        fields["attention_bias"] = False
    if family == "llama":
        fields["mlp_bias"] = False
    if family == "mistral":
        fields["sliding_window"] = extra.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        fields["use_sliding_window"] = False
        fields["sliding_window"] = None
    return fields


# The fields that define the network; a round trip must reproduce them.
ARCHITECTURE_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
)
