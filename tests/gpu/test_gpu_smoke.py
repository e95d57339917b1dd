"""On a CUDA machine: the Transformer Engine spec model trains a step over NCCL.

Skipped without CUDA. Run it with `make test-gpu` whenever a GPU machine is available
and record the GPU in docs/development.md ("Running on GPUs").
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.multiprocess import run_on_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _te_step(use_transformer_engine: bool) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from hpd_megatron.models.builder import build_gpt_model, layer_spec, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.schedule import causal_lm_forward, run_schedule

    description = ModelDescription(
        family="llama",
        num_layers=2,
        hidden_size=256,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=512,
        vocab_size=1000,
    )
    context = initialize_parallel(ParallelLayout(1, 1), seed=0)
    config = transformer_config(description, params_dtype=torch.bfloat16)
    model = build_gpt_model(
        description, config, spec=layer_spec(description, use_transformer_engine)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 1000, (2, 128), device="cuda")
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(127, device="cuda").expand(2, -1),
    }

    def forward_step(stage, micro_batch):
        logits = causal_lm_forward(stage, micro_batch)

        def loss_func(output):
            loss = vocab_parallel_cross_entropy(output.float(), micro_batch["labels"]).mean()
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        reports = run_schedule(model, [batch], forward_step, 127, 2)
        optimizer.step()
        losses.append(reports[0]["loss"].item())
    modules = {type(m).__module__.split(".")[0] for m in model.modules()}
    result = {
        "backend": context.backend,
        "losses": losses,
        "device": torch.cuda.get_device_name(),
        "uses_te": "transformer_engine" in modules,
    }
    destroy_parallel()
    return result


def test_transformer_engine_step_over_nccl():
    use_te = importlib.util.find_spec("transformer_engine") is not None
    result = run_on_ranks(_te_step, 1, use_te, timeout=600)[0]
    print(result)
    assert result["backend"] == "nccl"
    assert result["uses_te"] == use_te
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]
