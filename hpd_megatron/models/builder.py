"""ModelDescription -> TransformerConfig + layer spec -> GPTModel for this pipeline stage."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from hpd_megatron.models.description import ModelDescription

DEFAULT_VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(
    vocab_size: int, tensor_parallel_size: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by`` x TP.

    The rows past ``vocab_size`` are never real tokens; the losses mask them out.
    """
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


@functools.cache
def transformer_engine_import() -> tuple[str | None, str | None]:
    """(version, None) when ``transformer_engine.pytorch`` imports; (None, why) otherwise.

    An import, not ``find_spec``: a TE built for another torch or CUDA is found but fails
    to load its extension, and should fail here, by name, not in the first forward.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return None, "not installed"
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401 - loads the CUDA extension
    except Exception as error:  # noqa: BLE001 - any failure means a broken install
        return None, f"installed but broken ({type(error).__name__}: {error})"
    return str(getattr(transformer_engine, "__version__", "unknown")), None


def transformer_engine_available() -> bool:
    """Transformer Engine is used when it imports and CUDA is present."""
    return torch.cuda.is_available() and transformer_engine_import()[0] is not None


def layer_spec(
    model: ModelDescription, use_transformer_engine: bool | None = None, packed: bool = False
) -> ModuleSpec:
    """The Transformer Engine spec on a GPU with TE, Megatron-Core's local spec otherwise.

    ``packed`` (data.pack): the local spec's self-attention takes the block-diagonal mask
    the batch brings (``AttnMaskType.arbitrary``); with the causal type its fused softmax
    would build its own mask and ignore the given one. The TE spec stays as it is: THD
    attention turns causal into padding_causal itself.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
    if packed:
        attention = spec.submodules.self_attention
        attention.params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    return spec


def transformer_config(
    model: ModelDescription,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TransformerConfig:
    """The TransformerConfig of ``model`` on the current parallel_state grid.

    ``overrides`` pass straight to TransformerConfig (e.g. calculate_per_token_loss).
    """
    on_gpu = torch.cuda.is_available()
    # Fused kernels come from Transformer Engine (or apex) and exist only on the GPU.
    fused = transformer_engine_available()
    fields: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # On the CPU the master weight is built whole and then split, so the same seed
        # gives the same weights at every TP size (and no CUDA RNG is needed).
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        # Megatron-LM's default (arguments.py: on unless --no-bias-dropout-fusion). Megatron
        # fuses it with torch.compile, which on the CPU costs each process about 30 s of
        # compilation for a dropout of 0: off there.
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt_model(
    model: ModelDescription,
    config: TransformerConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    spec: ModuleSpec | None = None,
) -> GPTModel:
    """The GPTModel stage this rank holds (embedding on the first stage, head on the last).

    The returned module carries ``real_vocab_size``: the tokenizer's vocabulary, below
    the padded size of its output layer.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    vocab = padded_vocab_size(
        model.vocab_size, config.tensor_model_parallel_size, vocab_divisible_by
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec if spec is not None else layer_spec(model),
        vocab_size=vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
    )
    if model.rope_scaling is not None:
        # Megatron's rope_scaling flag fixes all but the factor; apply the full set.
        rope = gpt.rotary_pos_emb
        scaling = model.rope_scaling
        rope.inv_freq = rope._apply_scaling(
            rope.inv_freq,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    gpt.real_vocab_size = model.vocab_size
    return gpt
