"""The CPU emulation layer routes Megatron-Core's CUDA calls to the CPU and changes no numerics.

Each body runs in a fresh process: the layer patches torch for the whole process.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_on_ranks


def _routing_facts() -> dict:
    from hpd_megatron.parallel import cpu_emulation

    reference = torch.randn(6, generator=torch.Generator().manual_seed(3))
    enabled = cpu_emulation.enable()
    tensor = torch.ones(3)
    return {
        "enabled": enabled and cpu_emulation.is_enabled(),
        "current_device": str(torch.cuda.current_device()),
        "zeros_cuda": str(torch.zeros(2, device="cuda").device),
        "empty_ordinal": str(torch.empty(2, device=0).device),
        "tensor_cuda_device": str(torch.tensor([1, 2], device=torch.device("cuda", 0)).device),
        "cuda_method_is_identity": tensor.cuda() is tensor,
        "synchronize": torch.cuda.synchronize(),
        "type_name": tensor.type(),
        "type_conversion": str(tensor.type(torch.float64).dtype),
        # Routed factories draw exactly what the originals draw.
        "randn_same": torch.equal(
            torch.randn(6, generator=torch.Generator().manual_seed(3)), reference
        ),
        "randn_cuda_same": torch.equal(
            torch.randn(6, generator=torch.Generator().manual_seed(3), device="cuda"), reference
        ),
    }


def test_cuda_calls_are_routed_to_cpu():
    facts = run_on_ranks(_routing_facts, 1)[0]
    assert facts == {
        "enabled": True,
        "current_device": "cpu",
        "zeros_cuda": "cpu",
        "empty_ordinal": "cpu",
        "tensor_cuda_device": "cpu",
        "cuda_method_is_identity": True,
        "synchronize": None,
        "type_name": "torch.cuda.FloatTensor",
        "type_conversion": "torch.float64",
        "randn_same": True,
        "randn_cuda_same": True,
    }


def _rng_tracker_draws() -> dict[str, torch.Tensor]:
    from megatron.core import tensor_parallel

    from hpd_megatron.parallel import cpu_emulation

    cpu_emulation.enable()
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.rand(4)
    with tracker.fork():
        forked_1 = torch.rand(4)
    after = torch.rand(4)
    with tracker.fork():
        forked_2 = torch.rand(4)
    return {"before": before, "after": after, "forked_1": forked_1, "forked_2": forked_2}


def test_rng_tracker_forks_the_cpu_generator():
    draws = run_on_ranks(_rng_tracker_draws, 1)[0]
    # The default stream is seeded with the data-parallel seed and continues across forks
    # as if they had not happened.
    default = torch.Generator().manual_seed(123)
    assert torch.equal(draws["before"], torch.rand(4, generator=default))
    assert torch.equal(draws["after"], torch.rand(4, generator=default))
    # The model-parallel stream has Megatron's seed for TP rank 1: 123 + 2718 + 1, and
    # each fork continues where the last one stopped.
    model_parallel = torch.Generator().manual_seed(123 + 2718 + 1)
    assert torch.equal(draws["forked_1"], torch.rand(4, generator=model_parallel))
    assert torch.equal(draws["forked_2"], torch.rand(4, generator=model_parallel))


# ----------------------------------------------------------------------------------------
# A GPTModel built by the project against an independent dense implementation.

SEQ = 24
DENSE_MODELS = {
    "llama_gqa": dict(
        family="llama",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        vocab_size=300,
        rotary_base=10000.0,
    ),
    "qwen2_bias_tied": dict(
        family="qwen2",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        vocab_size=300,
        tie_word_embeddings=True,
        norm_epsilon=1e-6,
        rotary_base=1000000.0,
    ),
    "qwen3_qknorm_headdim": dict(
        family="qwen3",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=64,
        vocab_size=300,
        norm_epsilon=1e-6,
    ),
    # Llama 3.1 rope scaling with a tiny original context, so positions past it matter.
    "llama31_rope_scaling": dict(
        family="llama",
        num_layers=1,
        hidden_size=64,
        num_attention_heads=2,
        ffn_hidden_size=96,
        vocab_size=300,
        rotary_base=500000.0,
        rope_scaling=dict(
            type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
    ),
}


def _megatron_logits() -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=11)
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, -1)
    out = {}
    for name, kwargs in DENSE_MODELS.items():
        model = build_gpt_model(
            ModelDescription.from_dict(kwargs),
            transformer_config(ModelDescription.from_dict(kwargs)),
        )
        with torch.no_grad():
            # Norm weights start at one; randomise them so a misplaced norm shows.
            for key, parameter in model.named_parameters():
                if "layernorm" in key or "bias" in key:
                    parameter.add_(0.1 * torch.randn_like(parameter))
            logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        out[name] = (state, tokens, logits)
    destroy_parallel()
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _inverse_frequencies(kwargs: dict, head_dim: int) -> torch.Tensor:
    base = kwargs.get("rotary_base", 10000.0)
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    scaling = kwargs.get("rope_scaling")
    if scaling is None:
        return inv
    # Llama 3.1: keep high frequencies, divide low ones by the factor, blend in between.
    low_wavelength = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelength = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    wavelength = 2 * torch.pi / inv
    smooth = (
        scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"]
    ) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
    blended = (1 - smooth) * inv / scaling["factor"] + smooth * inv
    return torch.where(
        wavelength > low_wavelength,
        inv / scaling["factor"],
        torch.where(wavelength < high_wavelength, inv, blended),
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _dense_logits(
    kwargs: dict, state: dict[str, torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    """Llama/Qwen forward written from the architecture, reading Megatron's weight layout."""
    heads = kwargs["num_attention_heads"]
    groups = kwargs.get("num_query_groups") or heads
    head_dim = kwargs.get("kv_channels") or kwargs["hidden_size"] // heads
    eps = kwargs.get("norm_epsilon", 1e-5)
    batch, seq = tokens.shape
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * _inverse_frequencies(
        kwargs, head_dim
    )
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    x = state["embedding.word_embeddings.weight"][tokens]
    for layer in range(kwargs["num_layers"]):
        p = f"decoder.layers.{layer}."
        h = _rms_norm(
            x,
            state[p + "self_attention.linear_qkv.layer_norm_weight"]
            if p + "self_attention.linear_qkv.layer_norm_weight" in state
            else state[p + "input_layernorm.weight"],
            eps,
        )
        qkv = h @ state[p + "self_attention.linear_qkv.weight"].t()
        if p + "self_attention.linear_qkv.bias" in state:
            qkv = qkv + state[p + "self_attention.linear_qkv.bias"]
        # Megatron groups rows per KV group: [q heads of the group, k, v].
        qkv = qkv.view(batch, seq, groups, heads // groups + 2, head_dim)
        q = qkv[..., : heads // groups, :].reshape(batch, seq, heads, head_dim)
        k = qkv[..., heads // groups, :]
        v = qkv[..., heads // groups + 1, :]
        if p + "self_attention.q_layernorm.weight" in state:
            q = _rms_norm(q, state[p + "self_attention.q_layernorm.weight"], eps)
            k = _rms_norm(k, state[p + "self_attention.k_layernorm.weight"], eps)
        q = _rotate(q.transpose(1, 2), cos, sin)
        k = _rotate(k.transpose(1, 2), cos, sin).repeat_interleave(heads // groups, dim=1)
        v = v.transpose(1, 2).repeat_interleave(heads // groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        attention = attention.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        x = x + attention @ state[p + "self_attention.linear_proj.weight"].t()
        h = _rms_norm(x, state[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = (h @ state[p + "mlp.linear_fc1.weight"].t()).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.linear_fc2.weight"].t()
    x = _rms_norm(x, state["decoder.final_layernorm.weight"], eps)
    output = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return x @ output.t()


@pytest.fixture(scope="module")
def megatron_outputs():
    return run_on_ranks(_megatron_logits, 1)[0]


@pytest.mark.parametrize("name", sorted(DENSE_MODELS))
def test_gpt_model_matches_dense_implementation(megatron_outputs, name):
    state, tokens, logits = megatron_outputs[name]
    kwargs = DENSE_MODELS[name]
    assert logits.shape == (2, SEQ, 384)  # vocab 300 padded to a multiple of 128
    dense = _dense_logits(kwargs, state, tokens)
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=1e-5)


def test_rope_scaling_changes_positions_past_the_original_context(megatron_outputs):
    state, tokens, logits = megatron_outputs["llama31_rope_scaling"]
    unscaled = dict(DENSE_MODELS["llama31_rope_scaling"], rope_scaling=None)
    dense_unscaled = _dense_logits(unscaled, state, tokens)
    # Within the original context window the highest frequencies are untouched, but
    # past it the scaled model must differ from an unscaled one.
    assert (logits[:, 8:] - dense_unscaled[:, 8:]).abs().max() > 1e-3
