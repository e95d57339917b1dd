"""Parameters by part, and the FLOPs a token costs in training.

FLOPs per token: 6*N_student + 2*N_teacher (N: matmul parameters, i.e. all but the input
embedding and norms) + attention 4*s*nq*d per layer and forward pass (no causal saving),
x3 for the student and x1 for the teacher. s is the number of positions a token attends
to: data.seq_length here; the trainer's MFU of a packed step uses the step's own
sum(len^2) / sum(len) over its records (and each sample's padding, one more segment).
With loss.fused_head the backward recomputes each chunk's logits (2 x vocabulary x h FLOPs
per token for the student, and the teacher's for full-vocabulary methods): not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpd_megatron.models.builder import padded_vocab_size
from hpd_megatron.models.description import ModelDescription


@dataclass
class ParameterCount:
    """Parameters of one model, by part; ``replicated`` are the norms (not split by TP)."""

    embedding: int
    output_layer: int
    per_layer: int
    per_layer_replicated: int
    final_norm: int
    num_layers: int

    @property
    def total(self) -> int:
        return (
            self.embedding + self.output_layer + self.num_layers * self.per_layer + self.final_norm
        )


def count_parameters(model: ModelDescription, vocab_size: int | None = None) -> ParameterCount:
    """Exact parameter count; ``vocab_size`` defaults to the description's (pass the padded one)."""
    vocab = model.vocab_size if vocab_size is None else vocab_size
    h, d = model.hidden_size, model.kv_channels
    q_width, kv_width = model.num_attention_heads * d, model.num_query_groups * d
    qkv = h * (q_width + 2 * kv_width) + ((q_width + 2 * kv_width) if model.qkv_bias else 0)
    norms = 2 * h + (2 * d if model.qk_layernorm else 0)  # two RMSNorms (+ q and k norms)
    per_layer = qkv + q_width * h + 3 * h * model.ffn_hidden_size + norms
    return ParameterCount(
        embedding=vocab * h,
        output_layer=0 if model.tie_word_embeddings else vocab * h,
        per_layer=per_layer,
        per_layer_replicated=norms,
        final_norm=h,
        num_layers=model.num_layers,
    )


def stage_parameters_per_gpu(count: ParameterCount, tp: int, pp: int, stage: int) -> int:
    """Parameters one TP rank of pipeline ``stage`` holds (layers split evenly)."""
    layers = count.num_layers // pp
    sharded = layers * (count.per_layer - count.per_layer_replicated)
    replicated = layers * count.per_layer_replicated
    if stage == 0:
        sharded += count.embedding
    if stage == pp - 1:
        replicated += count.final_norm
        # Tied and pipelined: Megatron keeps a copy of the embedding on the last stage.
        sharded += count.output_layer or (count.embedding if pp > 1 else 0)
    return sharded // tp + replicated


def matmul_parameters(model: ModelDescription, count: ParameterCount) -> int:
    """The weights a forward multiplies by: all but the input embedding and the norms."""
    matmul = (
        count.total
        - count.embedding
        - count.final_norm
        - count.num_layers * count.per_layer_replicated
    )
    if model.tie_word_embeddings:
        matmul += count.embedding  # the output layer still multiplies by it
    return matmul


def matmul_flops_per_token(model: ModelDescription, count: ParameterCount, seq: float) -> float:
    """Forward FLOPs per token: 2 per matmul weight plus attention (QK^T and AV, no causal
    saving) over ``seq`` positions (a mean, not an integer, for packed samples)."""
    attention = 4 * seq * model.num_attention_heads * model.kv_channels * model.num_layers
    return 2 * matmul_parameters(model, count) + attention


def training_flops_per_token(
    student: ModelDescription, teacher: ModelDescription | None, seq: float, tp: int = 1
) -> float:
    """Training FLOPs per token: the student's forward and backward (3 forwards), the
    teacher's forward; vocabularies padded for TP as Megatron pads them. ``seq``: the
    positions a token attends to, data.seq_length, or for packed samples the mean
    sum(len^2) / sum(len) over the attention segments (training/metrics.py)."""
    flops = 3 * matmul_flops_per_token(
        student, count_parameters(student, padded_vocab_size(student.vocab_size, tp)), seq
    )
    if teacher is not None:
        teacher_count = count_parameters(teacher, padded_vocab_size(teacher.vocab_size, tp))
        flops += matmul_flops_per_token(teacher, teacher_count, seq)
    return float(flops)
