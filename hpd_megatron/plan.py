"""Will a recipe fit, and how long will a step take? Answered before any GPU is allocated.

    python -m hpd_megatron.plan --config recipes/llama3.1_70b_to_8b_hpd.yaml \
        --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 [--tflops 400] [--json plan.json]

Memory per GPU, on the worst pipeline stage (sizes in GiB; --gpu-mem-gb is read as GiB):
  teacher weights  2 B/param (bf16, frozen: no grads, no optimizer), sharded by TP and PP
  student weights  2 or 4 B/param (params_dtype)
  student grads    4 B/param (Megatron DDP with grad_reduce_in_fp32)
  optimizer        4 B/param fp32 master copy (bf16 only) + 8 B/param Adam moments,
                   divided by DP with optimizer.use_distributed_optimizer
  activations      per layer and micro-batch, no recompute and no sequence parallelism (what
                   the trainer does today), flash attention (no s x s scores), no dropout:
                   e*s*b*(4h + (2*nq*d + 2*nkv*d + 3f)/TP) bytes
                   (two norm inputs and two matmul inputs of width h; q, k, v and the attention
                   output; the SwiGLU gate/up outputs and its product), e = 2 (bf16) or 4;
                   the first stage of 1F1B holds min(PP, micro-batches) micro-batches.
                   The teacher runs under no_grad: it keeps only its logits.
  logits + loss    on the last stage: student logits, teacher logits and the student's
                   logits gradient, each b*s*V/TP*4 B, plus the loss kernel's six
                   [loss.chunk_size, V/TP] fp32 buffers (V = Megatron's padded vocabulary)
  overhead         4 GiB (CUDA context, NCCL buffers, allocator fragmentation)

FLOPs per token: 6*N_student + 2*N_teacher (N: matmul parameters, i.e. all but the input
embedding and norms) + attention 4*s*nq*d per layer and forward pass (no causal saving),
x3 for the student and x1 for the teacher. Step time = tokens per step x FLOPs per token /
(world x TFLOP/s) x (1 + (PP-1)/micro-batches) for the 1F1B pipeline bubble.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from hpd_megatron.cli import run_cli
from hpd_megatron.models.builder import padded_vocab_size
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout
from hpd_megatron.training.config import RunConfig, load_run_config
from hpd_megatron.training.inputs import check_inputs

GIB = 2**30
OVERHEAD_GIB = 4.0
LOSS_KERNEL_BUFFERS = 6
"""student_in, teacher_in, logp, logq, work, grad: see hpd_megatron/losses/kernel.py."""


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


def activation_bytes_per_layer(
    model: ModelDescription, micro_batch: int, seq: int, tp: int, element_bytes: int
) -> int:
    """Saved activations of one transformer layer for one micro-batch (formula in the module
    doc)."""
    d = model.kv_channels
    split = (
        2 * model.num_attention_heads * d
        + 2 * model.num_query_groups * d
        + 3 * model.ffn_hidden_size
    )
    return element_bytes * seq * micro_batch * (4 * model.hidden_size + split // tp)


def matmul_flops_per_token(model: ModelDescription, count: ParameterCount, seq: int) -> int:
    """Forward FLOPs per token: 2 per matmul weight plus attention (QK^T and AV, no causal
    saving)."""
    matmul = (
        count.total
        - count.embedding
        - count.final_norm
        - count.num_layers * count.per_layer_replicated
    )
    if model.tie_word_embeddings:
        matmul += count.embedding  # the output layer still multiplies by it
    attention = 4 * seq * model.num_attention_heads * model.kv_channels * model.num_layers
    return 2 * matmul + attention


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

    @property
    def total(self) -> float:
        return (
            self.teacher_weights
            + self.student_weights
            + self.student_grads
            + self.optimizer
            + self.activations
            + self.logits_and_loss
            + self.overhead
        )


@dataclass
class Plan:
    layout: dict
    world_size: int
    micro_batches_per_step: int
    padded_vocab: int
    student_parameters: int
    teacher_parameters: int
    stages: list[StageMemory]
    worst_stage: int
    worst_gib: float
    available_gib: float
    flops_per_token: float
    tokens_per_step: int
    step_seconds: float
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems and self.worst_gib <= self.available_gib


def layout_problems(
    run: RunConfig, world: int, gpus_per_node: int
) -> tuple[ParallelLayout, list[str], list[str]]:
    """Every violated divisibility rule (one string each) and warnings; the layout with DP set."""
    models = run.named_models()
    problems: list[str] = []
    layout = run.parallel
    try:
        layout = validate_layout(run.parallel, world, models)
    except LayoutError as error:
        problems += str(error).removeprefix("invalid parallel layout: ").split("; ")
        tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
        layout = ParallelLayout(
            tp,
            pp,
            layout.context_parallel_size,
            max(world // max(tp * pp * layout.context_parallel_size, 1), 1),
        )
    dp, mbs = layout.data_parallel_size, run.schedule.micro_batch_size
    if run.schedule.global_batch_size % (mbs * dp):
        problems.append(
            f"global_batch_size {run.schedule.global_batch_size} is not a multiple of "
            f"micro_batch_size x DP = {mbs} x {dp}"
        )
    warnings = []
    if layout.tensor_model_parallel_size > gpus_per_node:
        warnings.append(
            f"TP={layout.tensor_model_parallel_size} spans nodes ({gpus_per_node} GPUs "
            f"per node): tensor-parallel all-reduces would cross the network"
        )
    return layout, problems, warnings


@dataclass
class Setting:
    """What a plan's numbers depend on: the run, its layout and both models' sizes."""

    run: RunConfig
    layout: ParallelLayout
    student: ModelDescription
    teacher: ModelDescription | None
    student_count: ParameterCount
    """With the padded vocabulary, as for all the memory numbers."""
    teacher_count: ParameterCount | None
    vocab: int
    """The student's vocabulary padded for TP."""
    micro_batches: int
    """Per step and data-parallel rank."""

    @property
    def element_bytes(self) -> int:
        """Bytes of one student weight or activation element."""
        return 2 if self.run.params_dtype == "bf16" else 4


def make_setting(run: RunConfig, layout: ParallelLayout) -> Setting:
    tp = layout.tensor_model_parallel_size
    student = run.student.description("student")
    teacher = run.teacher_description()
    vocab = padded_vocab_size(student.vocab_size, tp)
    mbs = run.schedule.micro_batch_size
    return Setting(
        run,
        layout,
        student,
        teacher,
        count_parameters(student, vocab),
        count_parameters(teacher, padded_vocab_size(teacher.vocab_size, tp)) if teacher else None,
        vocab,
        max(run.schedule.global_batch_size // (mbs * layout.data_parallel_size), 1),
    )


def stage_memory(setting: Setting, stage: int) -> StageMemory:
    """The memory of one GPU of pipeline ``stage`` (formulas in the module doc)."""
    run, student, element = setting.run, setting.student, setting.element_bytes
    tp, pp = setting.layout.tensor_model_parallel_size, setting.layout.pipeline_model_parallel_size
    mbs, seq = run.schedule.micro_batch_size, run.data.seq_length
    n = stage_parameters_per_gpu(setting.student_count, tp, pp, stage)
    n_teacher = (
        stage_parameters_per_gpu(setting.teacher_count, tp, pp, stage)
        if setting.teacher_count
        else 0
    )
    in_flight = min(pp - stage, setting.micro_batches)  # 1F1B: stage i holds PP - i
    layer_activation = activation_bytes_per_layer(student, mbs, seq, tp, element)
    activations = in_flight * (student.num_layers // pp) * layer_activation
    if stage == 0:
        activations += in_flight * element * mbs * seq * student.hidden_size  # embedding output
    logits = 0
    if stage == pp - 1:
        copies = 3 if setting.teacher else 2  # student logits, its gradient, teacher logits
        shard = setting.vocab // tp
        logits = copies * mbs * seq * shard * 4
        logits += LOSS_KERNEL_BUFFERS * min(run.loss.chunk_size, mbs * seq) * shard * 4
    optimizer_shards = (
        setting.layout.data_parallel_size if run.optimizer.use_distributed_optimizer else 1
    )
    master = 4 if run.params_dtype == "bf16" else 0
    return StageMemory(
        stage=stage,
        teacher_weights=2 * n_teacher / GIB,
        student_weights=element * n / GIB,
        student_grads=4 * n / GIB,
        optimizer=(master + 8) * n / optimizer_shards / GIB,
        activations=activations / GIB,
        logits_and_loss=logits / GIB,
    )


def training_flops_per_token(
    student: ModelDescription, teacher: ModelDescription | None, seq: int, tp: int = 1
) -> float:
    """Training FLOPs per token: the student's forward and backward (3 forwards), the
    teacher's forward; vocabularies padded for TP as Megatron pads them."""
    flops = 3 * matmul_flops_per_token(
        student, count_parameters(student, padded_vocab_size(student.vocab_size, tp)), seq
    )
    if teacher is not None:
        teacher_count = count_parameters(teacher, padded_vocab_size(teacher.vocab_size, tp))
        flops += matmul_flops_per_token(teacher, teacher_count, seq)
    return float(flops)


def make_plan(
    run: RunConfig, nodes: int, gpus_per_node: int, gpu_mem_gib: float, tflops: float = 400.0
) -> Plan:
    world = nodes * gpus_per_node
    layout, problems, warnings = layout_problems(run, world, gpus_per_node)
    setting = make_setting(run, layout)
    stages = [stage_memory(setting, stage) for stage in range(layout.pipeline_model_parallel_size)]
    worst = max(stages, key=lambda m: m.total)
    flops = training_flops_per_token(
        setting.student,
        setting.teacher,
        setting.run.data.seq_length,
        setting.layout.tensor_model_parallel_size,
    )
    tokens = run.schedule.global_batch_size * run.data.seq_length
    bubble = 1 + (layout.pipeline_model_parallel_size - 1) / setting.micro_batches
    return Plan(
        layout={
            "TP": layout.tensor_model_parallel_size,
            "PP": layout.pipeline_model_parallel_size,
            "DP": layout.data_parallel_size,
        },
        world_size=world,
        micro_batches_per_step=setting.micro_batches,
        padded_vocab=setting.vocab,
        student_parameters=count_parameters(setting.student).total,
        teacher_parameters=count_parameters(setting.teacher).total if setting.teacher else 0,
        stages=stages,
        worst_stage=worst.stage,
        worst_gib=worst.total,
        available_gib=gpu_mem_gib,
        flops_per_token=flops,
        tokens_per_step=tokens,
        step_seconds=tokens * flops / (world * tflops * 1e12) * bubble,
        problems=problems,
        warnings=warnings,
    )


def format_table(plan: Plan) -> str:
    rows = [
        "teacher_weights",
        "student_weights",
        "student_grads",
        "optimizer",
        "activations",
        "logits_and_loss",
        "overhead",
    ]
    lay = plan.layout
    lines = [
        f"world {plan.world_size} GPUs: TP={lay['TP']} PP={lay['PP']} DP={lay['DP']}, "
        f"{plan.micro_batches_per_step} micro-batches per step, "
        f"padded vocab {plan.padded_vocab:,}",
        f"parameters (real vocab): student {plan.student_parameters:,}, "
        f"teacher {plan.teacher_parameters:,}",
        "",
        f"{'GiB per GPU':<18}" + "".join(f"{'stage ' + str(m.stage):>10}" for m in plan.stages),
    ]
    for row in rows:
        lines.append(f"{row:<18}" + "".join(f"{getattr(m, row):>10.2f}" for m in plan.stages))
    lines.append(f"{'total':<18}" + "".join(f"{m.total:>10.2f}" for m in plan.stages))
    lines += [
        "",
        f"worst stage {plan.worst_stage}: {plan.worst_gib:.2f} GiB of {plan.available_gib:.2f} GiB",
        f"compute: {plan.flops_per_token / 1e9:.1f} GFLOP per token, "
        f"{plan.tokens_per_step:,} tokens per step, about {plan.step_seconds:.1f} s per step",
    ]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpd_megatron.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, as for training")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--json", help="also write the plan here")
    parser.add_argument(
        "--check-inputs",
        action="store_true",
        help="also check that the checkpoints and data the run reads exist",
    )
    args = parser.parse_args(argv)
    run = load_run_config(args.config, args.overrides)
    if args.check_inputs:
        check_inputs(run)
    plan = make_plan(run, args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.tflops)
    print(format_table(plan))
    if args.json:
        data = asdict(plan) | {
            "fits": plan.fits,
            "stage_totals_gib": [m.total for m in plan.stages],
        }
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=2)
    if plan.fits:
        return 0
    for problem in plan.problems:
        print(f"error: {problem}", file=sys.stderr)
    if plan.worst_gib > plan.available_gib:
        print(
            f"error: does not fit: {plan.worst_gib:.2f} GiB needed on the worst stage "
            f"(stage {plan.worst_stage}), {plan.available_gib:.2f} GiB available",
            file=sys.stderr,
        )
    return 1


if __name__ == "__main__":
    run_cli(main)
