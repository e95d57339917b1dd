"""The pieces the training script assembles: models, optimizer, schedule hooks, loss step."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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
from hpd_megatron.losses import distillation_loss
from hpd_megatron.models.builder import build_gpt_model, transformer_config
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.collectives import any_rank
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.pair import DistillationPair
from hpd_megatron.training.schedule import Batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Models:
    pair: DistillationPair
    student: DistributedDataParallel
    student_description: ModelDescription
    teacher_description: ModelDescription | None


def check_shared_vocabulary(student: ModelDescription, teacher: ModelDescription | None) -> None:
    """Teacher and student must share token ids: HPD compares them position by position."""
    if teacher is not None and teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"teacher.model.vocab_size {teacher.vocab_size} != student.model.vocab_size "
            f"{student.vocab_size}: teacher and student must share one tokenizer"
        )


def build_models(
    run: RunConfig,
    student_description: ModelDescription,
    teacher_description: ModelDescription | None,
    resuming: bool = False,
) -> Models:
    """Student (DDP-wrapped, trainable) and frozen teacher stages on this rank's grid position.

    The student starts from ``checkpoint.load`` unless the run is ``resuming`` from its own
    checkpoint (which is loaded afterwards, with the optimizer)."""
    dtype = DTYPES[run.params_dtype]
    student_config = transformer_config(
        student_description,
        params_dtype=dtype,
        # The loss function returns (sum, num_tokens): the schedule then divides the
        # gradients by the global batch's token count, giving the global token mean.
        calculate_per_token_loss=True,
    )
    student = build_gpt_model(student_description, student_config)
    if run.checkpoint.load and not resuming:
        load_model_weights(student, run.checkpoint.load)
    teacher = None
    if teacher_description is not None:
        # A frozen teacher needs no fp32 master weights: bf16 on GPUs halves its memory.
        teacher_dtype = torch.bfloat16 if torch.cuda.is_available() else dtype
        teacher = build_gpt_model(
            teacher_description, transformer_config(teacher_description, params_dtype=teacher_dtype)
        )
        if run.teacher is not None and run.teacher.checkpoint:
            load_model_weights(teacher, run.teacher.checkpoint)
    ddp = DistributedDataParallel(
        config=student_config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=run.optimizer.use_distributed_optimizer,
        ),
        module=student,
    )
    pair = DistillationPair(
        ddp,
        teacher,
        student_description.hidden_size,
        teacher_description.hidden_size if teacher_description is not None else 0,
    )
    # The schedule takes these hooks from the config of "the model" (the student's).
    student_config.no_sync_func = ddp.no_sync
    student_config.finalize_model_grads_func = lambda _chunks, num_tokens=None, **kwargs: (
        finalize_model_grads([ddp], num_tokens, **kwargs)
    )
    return Models(pair, ddp, student_description, teacher_description)


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


def make_forward_step(run: RunConfig, models: Models, step: int) -> Callable:
    """forward_step for the schedule: pair forward, then the distillation loss on the last stage."""
    vocab_size = models.student_description.vocab_size
    loss = run.loss

    def forward_step(pair: DistillationPair, batch: Batch):
        student_logits = pair(batch)

        def loss_func(logits: torch.Tensor):
            uniforms = None
            if loss.method == "hpd":
                # Each sequence's sampling draws depend on that sequence alone.
                seq_length = batch["labels"].shape[1]
                uniforms = torch.stack(
                    [
                        torch.rand(
                            seq_length,
                            dtype=torch.float64,
                            generator=torch.Generator().manual_seed(
                                sample_seed(run.seed, step, int(index))
                            ),
                        )
                        for index in batch["sample_index"]
                    ]
                )
            loss_sum, diagnostics = distillation_loss(
                logits,
                pair.teacher_logits,
                batch["labels"],
                loss.method,
                vocab_size=vocab_size,
                alpha=loss.alpha,
                beta=loss.beta,
                reduction="sum",
                uniforms=uniforms,
                chunk_size=loss.chunk_size,
            )
            pair.teacher_logits = None
            num_tokens = diagnostics["num_tokens"].to(torch.int)
            # Sums, so the training loop can form exact means over the global batch.
            report = {
                name: value.detach().double() * num_tokens
                for name, value in diagnostics.items()
                if name not in ("loss_sum", "num_tokens", "loss")
            }
            report["loss"] = loss_sum.detach().double()
            report["num_tokens"] = num_tokens.double()
            return loss_sum, num_tokens, report

        return student_logits, loss_func

    return forward_step


def gradients_are_finite(student: DistributedDataParallel) -> bool:
    """Collective: True when every rank's reduced gradients are finite.

    Checked before the optimizer step (one pass over the flat gradient buffers), because
    Megatron's fp32 and bf16 optimizers would apply a NaN update.
    """
    local_bad = any(not bool(torch.isfinite(buffer.grad_data).all()) for buffer in student.buffers)
    return not any_rank(local_bad)


def reduce_reports(reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token means over every micro-batch and data-parallel replica (on the last stage)."""
    if not reports:
        return {}
    names = sorted(reports[0])
    totals = torch.stack([sum(r[name] for r in reports) for name in names])
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    values = dict(zip(names, totals.tolist()))
    tokens = values.pop("num_tokens")
    means = {name: value / max(tokens, 1.0) for name, value in values.items()}
    means["num_tokens"] = tokens
    return means
