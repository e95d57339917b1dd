"""The pieces the trainer assembles: the model pair with its DDP hooks, the optimizer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from hpd_megatron.checkpoint.weights import load_model_weights
from hpd_megatron.errors import ConfigError
from hpd_megatron.models.builder import build_gpt_model, layer_spec, transformer_config
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.models.dtypes import DTYPES
from hpd_megatron.parallel.collectives import any_rank
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.pair import DistillationPair
from hpd_megatron.training.performance import ModelSettings, Performance, resolve_performance


@dataclass
class Models:
    pair: DistillationPair
    student: DistributedDataParallel
    student_description: ModelDescription
    teacher_description: ModelDescription | None
    performance: Performance


def _in_dtype(model: torch.nn.Module, config) -> torch.nn.Module:
    """Every parameter in the model's dtype, as upstream's Float16Module casts a bf16 model.

    Without Transformer Engine, Megatron's torch-norm fallback keeps its weights in fp32,
    and Megatron's mixed-precision optimizer cannot save the state of such parameters.
    """
    for parameter in model.parameters():
        if parameter.dtype != config.params_dtype:
            parameter.data = parameter.data.to(config.params_dtype)
    return model


def build_model(
    description: ModelDescription, settings: ModelSettings, packed: bool, **overrides
) -> torch.nn.Module:
    """One model's stage with the performance section's settings, every parameter in dtype."""
    try:
        config = transformer_config(
            description, params_dtype=settings.params_dtype, **settings.overrides, **overrides
        )
    except (ValueError, AssertionError) as error:
        # TransformerConfig's own checks (e.g. recompute_num_layers against the layers).
        raise ConfigError(f"performance: Megatron-Core refused the settings: {error}") from None
    spec = layer_spec(description, settings.use_transformer_engine, packed=packed)
    return _in_dtype(build_gpt_model(description, config, spec=spec), config)


def build_models(
    run: RunConfig,
    student_description: ModelDescription,
    teacher_description: ModelDescription | None,
    resuming: bool = False,
) -> Models:
    """Student (DDP-wrapped, trainable) and frozen teacher stages on this rank's grid position.

    The student starts from ``checkpoint.load`` unless the run is ``resuming`` from its own
    checkpoint (which is loaded afterwards, with the optimizer)."""
    performance = resolve_performance(run, parallel_state.get_tensor_model_parallel_world_size())
    # The loss function returns (sum, num_tokens): the schedule then divides the
    # gradients by the global batch's token count, giving the global token mean.
    student = build_model(
        student_description, performance.student, run.data.pack, calculate_per_token_loss=True
    )
    if run.checkpoint.load and not resuming:
        load_model_weights(student, run.checkpoint.load, run.performance.fully_parallel_load)
    teacher = None
    if teacher_description is not None:
        teacher = build_model(teacher_description, performance.teacher, run.data.pack)
        if run.teacher is not None and run.teacher.checkpoint:
            load_model_weights(teacher, run.teacher.checkpoint, run.performance.fully_parallel_load)
    student_config = student.config
    ddp = DistributedDataParallel(
        config=student_config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=run.optimizer.use_distributed_optimizer,
            **performance.ddp,
        ),
        module=student,
    )
    pair = DistillationPair(
        ddp,
        teacher,
        student_description.hidden_size,
        teacher_description.hidden_size if teacher_description is not None else 0,
        fused_head=run.loss.fused_head,
        vocab_size=student_description.vocab_size,
    )
    _install_schedule_hooks(student_config, ddp)
    return Models(pair, ddp, student_description, teacher_description, performance)


def _install_schedule_hooks(config, ddp: DistributedDataParallel) -> None:
    """The hooks the schedule takes from the config of "the model" (the student's).

    As upstream's ``train`` (megatron/training/training.py) sets them for one model chunk:
    gradient sync held back until the last micro-batch, then started bucket by bucket
    during its backward pass when overlap_grad_reduce is on.
    """
    config.no_sync_func = ddp.no_sync
    if ddp.ddp_config.overlap_grad_reduce:
        config.grad_sync_func = ddp.start_grad_sync
    config.finalize_model_grads_func = lambda _chunks, num_tokens=None, **kwargs: (
        finalize_model_grads([ddp], num_tokens, **kwargs)
    )


@contextmanager
def parameters_gathered(student: DistributedDataParallel) -> Iterator[None]:
    """The student's current weights on every rank, for a save or an export.

    With ``overlap_param_gather`` the distributed optimizer's update reaches the other
    replicas only in the next forward's hooks; upstream's ``save_checkpoint_and_time``
    (megatron/training/training.py) disables the hooks, which gathers now, and enables them
    again after the save.
    """
    if not student.use_forward_hook:
        yield
        return
    student.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        student.enable_forward_pre_hook()


def build_optimizer(run: RunConfig, student: DistributedDataParallel):
    """Megatron-Core's AdamW (decoupled weight decay), clipping and LR schedule."""
    opt = run.optimizer
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.lr * opt.min_lr_ratio,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=run.params_dtype == "bf16",
            params_dtype=DTYPES[run.params_dtype],
            use_distributed_optimizer=opt.use_distributed_optimizer,
            # Must match the DDP wrapper's: the gather then happens in its forward hooks.
            overlap_param_gather=student.ddp_config.overlap_param_gather,
        ),
        [student],
    )
    steps = run.schedule.train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.lr * opt.min_lr_ratio,
        lr_warmup_steps=run.schedule.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=run.schedule.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def sample_seed(run_seed: int, step: int, sample_index: int) -> int:
    """HPD's sampling seed for one sequence: a function of (seed, step, global sample).

    Not of the rank, micro-batch size or layout, so every layout draws the same yh.
    """
    digest = hashlib.sha256(f"{run_seed}/{step}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def gradients_are_finite(student: DistributedDataParallel) -> bool:
    """Collective: True when every rank's reduced gradients are finite.

    Checked before the optimizer step (one pass over the flat gradient buffers), because
    Megatron's fp32 and bf16 optimizers would apply a NaN update.
    """
    local_bad = any(not bool(torch.isfinite(buffer.grad_data).all()) for buffer in student.buffers)
    return not any_rank(local_bad)
