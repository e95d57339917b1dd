"""Memory per GPU, on each pipeline stage (sizes in GiB; --gpu-mem-gb is read as GiB).

teacher weights  2 B/param (bf16, frozen: no grads, no optimizer), sharded by TP and PP
student weights  2 or 4 B/param (params_dtype)
student grads    4 B/param (Megatron DDP with grad_reduce_in_fp32)
optimizer        4 B/param fp32 master copy (bf16 only) + 8 B/param Adam moments,
                 divided by DP with optimizer.use_distributed_optimizer
activations      per layer and micro-batch, no recompute, flash attention (no s x s
                 scores), no dropout: e*s*b*(4h/t + (2*nq*d + 2*nkv*d + 3f)/TP) bytes
                 (two norm inputs and two matmul inputs of width h, split along the
                 sequence with SP: t = TP with SP, else 1; q, k, v and the attention output;
                 the SwiGLU gate/up outputs and its product), e = 2 (bf16) or 4;
                 the first stage of 1F1B holds min(PP, micro-batches) micro-batches.
                 The teacher runs under no_grad: it keeps only what the loss reads.
logits + loss    on the last stage, by the loss head the recipe uses (V = Megatron's
                 padded vocabulary of the student, T = b*s tokens of a micro-batch):
                 materialised logits (loss.fused_head false): student logits, teacher
                 logits and the student's logits gradient, each T*V/TP*4 B, plus the
                 loss kernel's six [chunk, V/TP] fp32 buffers, chunk = loss.chunk_size
                 or, unset, the trainer's UNFUSED_CHUNK_TOKENS (1,024);
                 fused head (loss.fused_head true): no [T, V/TP] tensor at all; the
                 figure is hpd_megatron.losses.fused_head.fused_head_bytes, called with
                 T, V/TP, both hidden sizes (the teacher's 0 without one), whether the
                 method is a full-vocabulary one, loss.chunk_size, e and t. It adds up,
                 as its docstring says: the chunk workspace, FUSED_BUFFERS fp32 [chunk,
                 V/TP] buffers (4 for token methods, 7 for full-vocabulary ones), plus one
                 [chunk, V/TP] GEMM output in bf16 (e = 2), chunk = loss.chunk_size or 16 Mi
                 elements of the V/TP shard (at most T); PER_TOKEN_BYTES (72) of per-token
                 state per position; the student hidden states' gradient, T*h_student*e;
                 DDP's dummy output-weight gradient, V/TP*h_student*e; for full-vocabulary
                 methods the teacher's hidden states kept for the backward, T/t*h_teacher*e;
                 with SP the all-gathered hidden states of both models, T*(h_s + h_t)*e.
overhead         4 GiB (CUDA context, NCCL buffers, allocator fragmentation)
kv_cache         with rollouts only: the student's static KV cache while it generates,
                 2 (K, V) x layers on the stage x num_query_groups/TP x kv_channels x e x
                 rows per DP rank x seq_length. Freed before the training forward, it shares
                 memory with activations + logits_and_loss: the total counts the larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpd_megatron.losses import FULL_VOCAB_METHODS
from hpd_megatron.losses.fused_head import fused_head_bytes
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.plan.counts import stage_parameters_per_gpu
from hpd_megatron.plan.setting import Setting
from hpd_megatron.training.config import UNFUSED_CHUNK_TOKENS

GIB = 2**30
OVERHEAD_GIB = 4.0
LOSS_KERNEL_BUFFERS = 6
"""student_in, teacher_in, logp, logq, work, grad: see hpd_megatron/losses/kernel.py."""


@dataclass
class StageMemory:
    stage: int
    teacher_weights: float
    student_weights: float
    student_grads: float
    optimizer: float
    activations: float
    logits_and_loss: float
    overhead: float = OVERHEAD_GIB
    kv_cache: float = 0.0
    """The rollouts' KV cache (0 without rollouts)."""

    @property
    def total(self) -> float:
        # The KV cache lives while the student generates and is freed before the training
        # forward: it reuses the memory of the activations and logits, so only what it needs
        # beyond them raises the peak (nothing at all without rollouts).
        training_phase = self.activations + self.logits_and_loss
        return (
            self.teacher_weights
            + self.student_weights
            + self.student_grads
            + self.optimizer
            + self.activations
            + self.logits_and_loss
            + self.overhead
            + max(self.kv_cache - training_phase, 0.0)
        )


def activation_bytes_per_layer(
    model: ModelDescription,
    micro_batch: int,
    seq: int,
    tp: int,
    element_bytes: int,
    sequence_parallel: bool = False,
) -> int:
    """Saved activations of one transformer layer for one micro-batch (formula in the module
    doc)."""
    d = model.kv_channels
    split = (
        2 * model.num_attention_heads * d
        + 2 * model.num_query_groups * d
        + 3 * model.ffn_hidden_size
    )
    width = 4 * model.hidden_size // (tp if sequence_parallel else 1)
    return element_bytes * seq * micro_batch * (width + split // tp)


def kv_cache_bytes(
    model: ModelDescription, layers: int, tp: int, element_bytes: int, rows: int, positions: int
) -> int:
    """Keys and values of ``layers`` layers for ``rows`` rows of ``positions`` positions on one
    TP rank (each holds num_query_groups / TP of the KV heads)."""
    heads = model.num_query_groups // tp
    return 2 * layers * heads * model.kv_channels * element_bytes * rows * positions


def stage_activation_bytes(setting: Setting, stage: int) -> int:
    """The activations pipeline ``stage`` keeps: 1F1B holds PP - stage micro-batches there."""
    run, student, element = setting.run, setting.student, setting.element_bytes
    tp, pp = setting.layout.tensor_model_parallel_size, setting.layout.pipeline_model_parallel_size
    mbs, seq, sp = run.schedule.micro_batch_size, run.data.seq_length, setting.sequence_parallel
    in_flight = min(pp - stage, setting.micro_batches)
    layer = activation_bytes_per_layer(student, mbs, seq, tp, element, sp)
    activations = in_flight * (student.num_layers // pp) * layer
    if stage == 0:  # the embedding output, split along the sequence with SP
        embedding = element * mbs * seq * student.hidden_size
        activations += in_flight * embedding // (tp if sp else 1)
    return activations


def materialised_logits_bytes(setting: Setting) -> int:
    """The last stage's logits, their gradient and the loss kernel's chunk buffers, all fp32."""
    run, tp = setting.run, setting.layout.tensor_model_parallel_size
    tokens = run.schedule.micro_batch_size * run.data.seq_length
    copies = 3 if setting.teacher else 2  # student logits, its gradient, teacher logits
    shard = setting.vocab // tp
    chunk = min(run.loss.chunk_size or UNFUSED_CHUNK_TOKENS, tokens)
    return copies * tokens * shard * 4 + LOSS_KERNEL_BUFFERS * chunk * shard * 4


def fused_logits_bytes(setting: Setting) -> int:
    """The fused head's peak on the last stage: ``fused_head_bytes`` for this run."""
    run, tp = setting.run, setting.layout.tensor_model_parallel_size
    return fused_head_bytes(
        tokens=run.schedule.micro_batch_size * run.data.seq_length,
        vocab_per_rank=setting.vocab // tp,
        student_hidden=setting.student.hidden_size,
        teacher_hidden=setting.teacher.hidden_size if setting.teacher else 0,
        dense=run.loss.method in FULL_VOCAB_METHODS,
        chunk_size=run.loss.chunk_size,
        element_bytes=setting.element_bytes,
        sequence_parallel_tp=tp if setting.sequence_parallel else 1,
    )


def logits_and_loss_bytes(setting: Setting) -> int:
    """The last stage's head and loss, on the path loss.fused_head picks (module doc)."""
    if setting.run.loss.fused_head:
        return fused_logits_bytes(setting)
    return materialised_logits_bytes(setting)


def stage_memory(setting: Setting, stage: int) -> StageMemory:
    """The memory of one GPU of pipeline ``stage`` (formulas in the module doc)."""
    run, element = setting.run, setting.element_bytes
    tp, pp = setting.layout.tensor_model_parallel_size, setting.layout.pipeline_model_parallel_size
    n = stage_parameters_per_gpu(setting.student_count, tp, pp, stage)
    n_teacher = (
        stage_parameters_per_gpu(setting.teacher_count, tp, pp, stage)
        if setting.teacher_count
        else 0
    )
    optimizer_shards = (
        setting.layout.data_parallel_size if run.optimizer.use_distributed_optimizer else 1
    )
    master = 4 if run.params_dtype == "bf16" else 0
    kv_cache = kv_cache_bytes(
        setting.student,
        setting.student.num_layers // pp,
        tp,
        element,
        setting.rollout_rows_per_dp_rank,
        run.data.seq_length,
    )
    return StageMemory(
        stage=stage,
        teacher_weights=2 * n_teacher / GIB,
        student_weights=element * n / GIB,
        student_grads=4 * n / GIB,
        optimizer=(master + 8) * n / optimizer_shards / GIB,
        activations=stage_activation_bytes(setting, stage) / GIB,
        logits_and_loss=(logits_and_loss_bytes(setting) if stage == pp - 1 else 0) / GIB,
        kv_cache=kv_cache / GIB,
    )
