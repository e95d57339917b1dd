"""The same weights give the same logits and gradients at every TP x PP layout.

Weights are created once at TP1 PP1 and moved to the other layouts with
dist_checkpointing (the engine's own resharding). Gradients computed at TP2 PP2 are
written back through the same format and read at TP1 PP1 for comparison, so no
test code has to know how Megatron splits QKV or SwiGLU weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multiprocess import run_on_ranks

VOCAB = 1000  # pads to 1024 at TP1 and TP2 alike, so the checkpoints have one shape
SEQ, BATCH = 16, 2
MODELS = {
    # Llama-like grouped-query attention: 4 heads sharing 2 KV groups.
    "llama_gqa": dict(
        family="llama",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=160,
        vocab_size=VOCAB,
        rotary_base=500000.0,
    ),
    # Qwen2-like: QKV bias and tied input/output embeddings.
    "qwen2_bias": dict(
        family="qwen2",
        num_layers=2,
        hidden_size=48,
        num_attention_heads=4,
        num_query_groups=4,
        ffn_hidden_size=96,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        norm_epsilon=1e-6,
    ),
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    # A fixed random weighting of every logit: its gradient reaches every parameter.
    logit_weights = torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    return tokens, positions, logit_weights


def _run(
    tp: int, pp: int, seed: int, load_dir: str | None, save_dir: str | None, grad_dir: str | None
) -> dict[str, dict[str, torch.Tensor]]:
    """Build both models at TP x PP, optionally load weights, run forward+backward.

    Returns, on the last pipeline stage's TP rank 0, the real-vocabulary logits and
    loss of each model.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from hpd_megatron.checkpoint.weights import load_model_weights, save_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.schedule import causal_lm_forward, run_schedule

    descriptions = {name: ModelDescription.from_dict(kw) for name, kw in MODELS.items()}
    initialize_parallel(ParallelLayout(tp, pp), seed=seed, models=descriptions.items())
    tokens, positions, logit_weights = _inputs()
    results = {}
    for name, description in descriptions.items():
        model = build_gpt_model(description, transformer_config(description))
        if load_dir is not None:
            load_model_weights(model, Path(load_dir) / name)
        if save_dir is not None:
            save_model_weights(model, Path(save_dir) / name)

        def forward_step(stage, batch):
            output = causal_lm_forward(stage, batch)

            def loss_func(logits):
                full = gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]
                loss = (full.float() * logit_weights).sum()
                return loss, {"logits": full.detach().clone(), "loss": loss.detach().clone()}

            return output, loss_func

        reports = run_schedule(
            model,
            [{"tokens": tokens, "position_ids": positions}],
            forward_step,
            seq_length=SEQ,
            micro_batch_size=BATCH,
        )
        if description.tie_word_embeddings and pp > 1:
            # The first and last stage each hold a copy of the tied weight; training
            # sums their gradients (finalize_model_grads); here we do it by hand.
            if parallel_state.is_rank_in_embedding_group():
                shared = model.shared_embedding_or_output_weight()
                torch.distributed.all_reduce(
                    shared.grad, group=parallel_state.get_embedding_group()
                )
        if grad_dir is not None:
            # Write gradients in place of weights so the checkpoint format gathers them.
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.grad)
            save_model_weights(model, Path(grad_dir) / name)
        if reports and parallel_state.get_tensor_model_parallel_rank() == 0:
            results[name] = reports[0]
    destroy_parallel()
    return results


def _read_weights(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """Every model's parameters, as a TP1 PP1 process sees them after loading."""
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1), seed=99)
    weights = {}
    for name, kwargs in MODELS.items():
        description = ModelDescription.from_dict(kwargs)
        model = build_gpt_model(description, transformer_config(description))
        load_model_weights(model, Path(directory) / name)
        weights[name] = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
        }
    destroy_parallel()
    return weights


def _last_stage(results: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    filled = [r for r in results if r]
    assert len(filled) == 1, f"expected one reporting rank, got {len(filled)}"
    return filled[0]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    weights, ref_grads, tp2pp2_grads = (str(root / d) for d in ("weights", "g11", "g22"))
    outcome = {}
    outcome[(1, 1)] = _last_stage(run_on_ranks(_run, 1, 1, 1, 1, None, weights, ref_grads))
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        # A different seed proves the logits come from the loaded weights.
        grad_dir = tp2pp2_grads if (tp, pp) == (2, 2) else None
        outcome[(tp, pp)] = _last_stage(
            run_on_ranks(_run, tp * pp, tp, pp, 1000 + tp * 10 + pp, weights, None, grad_dir)
        )
    outcome["grads"] = run_on_ranks(_read_weights, 1, ref_grads)[0]
    outcome["grads_tp2pp2"] = run_on_ranks(_read_weights, 1, tp2pp2_grads)[0]
    return outcome


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_logits_equal_across_layouts(layouts, name, tp, pp):
    reference = layouts[(1, 1)][name]["logits"]
    other = layouts[(tp, pp)][name]["logits"]
    assert reference.shape == (BATCH, SEQ, VOCAB)
    assert reference.abs().max() > 1e-3, "logits are degenerate; the comparison would prove nothing"
    torch.testing.assert_close(other, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_equal_at_tp2_pp2(layouts, name):
    reference, other = layouts["grads"][name], layouts["grads_tp2pp2"][name]
    assert set(reference) == set(other)
    assert len(reference) > 5
    for key, grad in reference.items():
        assert grad.abs().max() > 0, f"{key}: zero gradient, the comparison would prove nothing"
        # fp32 sums in a different order: tolerate rounding relative to the tensor's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            other[key],
            grad,
            atol=1e-5 * max(scale, 1.0),
            rtol=1e-4,
            msg=lambda m, key=key: f"{key}: {m}",
        )


def _ddp_main_grads(tp: int, pp: int) -> dict:
    """The tied Qwen2-like model in Megatron DDP (overlapped gradient reduction, as the
    trainer builds it), an SFT loss through the schedule unfused and fused: each
    parameter's main_grad after finalize_model_grads (which sums the tied embedding's two
    copies when PP > 1), per rank."""
    from functools import partial

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from hpd_megatron.losses import distillation_loss
    from hpd_megatron.losses.distillation import fused_distillation_loss
    from hpd_megatron.losses.fused_head import OutputHead
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from hpd_megatron.training.schedule import (
        causal_lm_forward,
        causal_lm_hidden_states,
        output_weight,
        run_schedule,
    )

    description = ModelDescription.from_dict(MODELS["qwen2_bias"])
    initialize_parallel(ParallelLayout(tp, pp), seed=5, models=[("qwen2_bias", description)])
    config = transformer_config(description)
    model = build_gpt_model(description, config)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.no_sync_func, config.grad_sync_func = ddp.no_sync, ddp.start_grad_sync
    config.finalize_model_grads_func = partial(lambda chunks, *a, **k: finalize_model_grads([ddp]))
    tokens, positions, _ = _inputs()
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, :3] = -100

    def step(fused: bool, stage, batch):
        last = model.post_process
        output = (causal_lm_hidden_states if fused and last else causal_lm_forward)(stage, batch)

        def loss_func(out):
            kwargs = dict(vocab_size=VOCAB, reduction="sum", tp_group="parallel_state")
            if fused:
                head = OutputHead(out, output_weight(stage))
                loss, diag = fused_distillation_loss(head, None, labels, "sft", **kwargs)
            else:
                loss, diag = distillation_loss(out, None, labels, "sft", **kwargs)
            return loss, diag["num_tokens"].int(), {"loss": loss.detach().clone()}

        return output, loss_func

    grads = {}
    for fused in (False, True):
        ddp.zero_grad_buffer()
        reports = run_schedule(
            ddp,
            [{"tokens": tokens, "position_ids": positions}],
            partial(step, fused),
            seq_length=SEQ,
            micro_batch_size=BATCH,
        )
        grads[fused] = {
            "main_grad": {n: p.main_grad.clone() for n, p in model.named_parameters()},
            "loss": [r["loss"] for r in reports],
        }
    destroy_parallel()
    return grads


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_fused_head_gradients_reach_ddp_main_grad_with_tied_embeddings(tp, pp):
    """loss.fused_head's weight gradient lands in DDP's main_grad exactly as the output
    layer's does: with PP = 1 added to the embedding lookup's (zero_out_wgrad), with PP = 2
    summed over the tied copies; every other gradient is unchanged too."""
    for rank, grads in enumerate(run_on_ranks(_ddp_main_grads, tp * pp, tp, pp)):
        unfused, fused = grads[False], grads[True]
        for a, b in zip(fused["loss"], unfused["loss"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        assert set(fused["main_grad"]) == set(unfused["main_grad"])
        for name, reference in unfused["main_grad"].items():
            got = fused["main_grad"][name]
            scale = float(reference.norm())
            assert scale > 0, f"rank {rank} {name}: zero gradient proves nothing"
            error = float((got - reference).norm())
            assert error <= 1e-6 * scale, f"rank {rank} {name}: relative error {error / scale:.3g}"
