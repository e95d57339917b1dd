"""Will a recipe fit, and how long will a step take? Answered before any GPU is allocated.

    python -m hpd_megatron.plan --config recipes/llama3.1_70b_to_8b_hpd.yaml \
        --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 [--tflops 400] [--hbm-gb-s 3350] \
        [--intra-node-gb-s 450] [--inter-node-gb-s 200] [--top 5] [--json plan.json]

Prints the recipe's own layout in detail, then every TP x PP layout of the same GPUs that
fits, ranked by estimated step time. Planning reads no checkpoint or data path (an unset
${VARIABLE} in the recipe stays as written); --check-inputs also checks that they exist.
Every time below is an estimate from this model, not a measurement.

Sequence parallelism (SP) is assumed where the trainer turns it on on GPUs: TP > 1 with
Transformer Engine, unless performance.sequence_parallel says otherwise.

Memory per GPU, on the worst pipeline stage (sizes in GiB; --gpu-mem-gb is read as GiB):
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
                   The teacher runs under no_grad: it keeps only its logits.
  logits + loss    on the last stage: student logits, teacher logits and the student's
                   logits gradient, each b*s*V/TP*4 B, plus the loss kernel's six
                   [loss.chunk_size, V/TP] fp32 buffers (V = Megatron's padded vocabulary)
  overhead         4 GiB (CUDA context, NCCL buffers, allocator fragmentation)
  kv_cache         with rollouts only: the student's static KV cache while it generates,
                   2 (K, V) x layers on the stage x num_query_groups/TP x kv_channels x e x
                   rows per DP rank x seq_length. Freed before the training forward, it shares
                   memory with activations + logits_and_loss: the total counts the larger.

FLOPs per token: 6*N_student + 2*N_teacher (N: matmul parameters, i.e. all but the input
embedding and norms) + attention 4*s*nq*d per layer and forward pass (no causal saving),
x3 for the student and x1 for the teacher. s is the number of positions a token attends
to: data.seq_length here; the trainer's MFU of a packed step uses the step's own
sum(len^2) / sum(len) over its records (and each sample's padding, one more segment).

Step time, with m micro-batches per data-parallel rank and per-micro-batch times on one
stage (the stages are balanced: layers split evenly):
  step = m*(c + tp + p2p) + (PP-1)*(c + tp + p2p) + dp
  (the second term is the 1F1B bubble; nothing is assumed to overlap, as by default)
  c    compute, b*s*FLOPs per token / (TP*PP*--tflops). m*c alone is the lower bound
       printed as "compute"; each term below only adds to it.
  tp   tensor parallelism: see tensor_parallel_seconds (all-reduces, or with SP the
       all-gather + reduce-scatter pairs of the same volume)
  p2p  pipeline: see pipeline_p2p_seconds
  dp   gradient reduce-scatter + parameter all-gather (distributed optimizer) or gradient
       all-reduce, once per step: see data_parallel_seconds
Collectives are rings: a reduce-scatter or an all-gather of a tensor of M bytes over n GPUs
moves (n-1)/n*M bytes through each GPU's link, an all-reduce twice that. Links (GB/s, one
direction, nominal H100-class rates, so the communication terms are optimistic): inside a
node NVLink, 450 GB/s per GPU (--intra-node-gb-s); between nodes 200 GB/s per node (4 x 400
Gb/s InfiniBand, --inter-node-gb-s), shared by the node's GPUs, which all communicate at once.
Megatron orders ranks TP fastest, then DP, then PP: a TP group fits in a node when TP <= GPUs
per node, a DP group when TP*DP does, a pipeline when the whole world does; a group that does
not uses the inter-node figure. Left out: the loss kernel's collectives (a few floats per
token), the tied-embedding gradient all-reduce between the first and last stage.

Rollouts (rollout.fraction = lambda > 0) add their time to the step: step = training +
rollout. Before the training forward the student answers floor(lambda x global_batch_size)
rows per step, spread over the batch's positions as the trainer picks them
(hpd_megatron/training/rollout.py); the busiest DP rank's rows set the step. It generates
as hpd_megatron/eval/generate.py does: all of a rank's rows in one batch with
Megatron-Core's static KV cache, one micro-batch through the pipeline, so its stages take
turns (a forward costs the whole model's time per TP rank, not 1/PP of it). The prompt
length is not known before the data is read: it is estimated as P = data.seq_length -
max_new_tokens, and every reply as max_new_tokens = n long (no early EOS).
  FLOPs per row, forward only: the prefill, P x the forward FLOPs per token at s = P less
  the output layer on all but the last position (the static cache materialises only the
  last position's logits); then n - 1 one-token forwards, the one at context c (P < c < P +
  n) at 2 x matmul parameters + 4*c*nq*d*L (the n-th token is sampled, never fed).
  time per forward (roofline): max(FLOPs / (TP x --tflops), bytes / --hbm-gb-s), bytes =
  the student's matmul weights on one TP rank of every stage (each stage reads its own once)
  + for a decode forward the KV cache up to context c. Decoding is memory-bound: HBM_GB_S
  (H100 SXM) is the nominal peak, and kernel launches and the per-layer TP all-reduces'
  latency are not counted, so the decode time is a lower bound (the full-length replies
  make it an upper bound on the tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from hpd_megatron.cli import run_cli
from hpd_megatron.config import unset_variables_kept
from hpd_megatron.models.builder import padded_vocab_size
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout
from hpd_megatron.training.config import RunConfig, load_run_config
from hpd_megatron.training.inputs import check_inputs
from hpd_megatron.training.performance import (
    sequence_parallel,
    sequence_parallel_problems,
    transformer_engine_problems,
)
from hpd_megatron.training.rollout import is_rollout

GIB = 2**30
OVERHEAD_GIB = 4.0
LOSS_KERNEL_BUFFERS = 6
"""student_in, teacher_in, logp, logq, work, grad: see hpd_megatron/losses/kernel.py."""
TOP_LAYOUTS = 5
HBM_GB_S = 3350.0
"""GPU memory bandwidth, GB/s: H100 SXM5's HBM3, 3.35 TB/s (NVIDIA's H100 datasheet). A
nominal peak: decode times from it are lower bounds."""


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


def prefill_flops(model: ModelDescription, count: ParameterCount, prompt: int) -> int:
    """Forward FLOPs of one row's ``prompt`` tokens with the static KV cache: the output layer
    runs on the last position only (Megatron-Core's StaticInferenceContext materialises only
    the last token's logits)."""
    output = count.output_layer or count.embedding
    return prompt * matmul_flops_per_token(model, count, prompt) - (prompt - 1) * 2 * output


def kv_cache_bytes(
    model: ModelDescription, layers: int, tp: int, element_bytes: int, rows: int, positions: int
) -> int:
    """Keys and values of ``layers`` layers for ``rows`` rows of ``positions`` positions on one
    TP rank (each holds num_query_groups / TP of the KV heads)."""
    heads = model.num_query_groups // tp
    return 2 * layers * heads * model.kv_channels * element_bytes * rows * positions


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


@dataclass
class Interconnect:
    """Link bandwidths in GB/s (1e9 bytes/s) in one direction (defaults: module doc)."""

    intra_node_gb_s: float = 450.0
    """Per GPU inside a node: H100 NVLink, 18 links x 25 GB/s."""
    inter_node_gb_s: float = 200.0
    """Per node between nodes: 4 x 400 Gb/s InfiniBand, shared by the node's GPUs."""

    def bytes_per_second(self, span: int, gpus_per_node: int) -> float:
        """What one GPU gets in a group whose members lie within ``span`` consecutive ranks."""
        if span <= gpus_per_node:
            return self.intra_node_gb_s * 1e9
        return self.inter_node_gb_s * 1e9 / gpus_per_node


def ring_seconds(tensor_bytes: float, ranks: int, bandwidth: float, phases: int = 1) -> float:
    """A ring reduce-scatter or all-gather (one phase) of a ``tensor_bytes`` tensor over
    ``ranks`` GPUs: each GPU sends (ranks-1)/ranks of it; an all-reduce is two phases. Zero
    for one GPU."""
    return phases * (ranks - 1) / ranks * tensor_bytes / bandwidth


@dataclass
class StepTime:
    """Seconds per step, by cause (formulas in the module doc). Estimates, not measurements."""

    compute: float
    """FLOPs at --tflops alone, no bubble, no communication: a lower bound."""
    tensor_parallel: float
    pipeline_p2p: float
    bubble: float
    data_parallel: float
    rollout: float = 0.0
    """The student's generation before the training forward (RolloutCost.seconds)."""

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.tensor_parallel
            + self.pipeline_p2p
            + self.bubble
            + self.data_parallel
            + self.rollout
        )


@dataclass
class RolloutCost:
    """The rollouts of one step (module doc). FLOPs over all DP ranks; seconds on the slowest
    rank, which generates ``rows_per_dp_rank`` rows."""

    rows: int
    rows_per_dp_rank: int
    prompt_tokens: int
    """Estimated: data.seq_length - rollout.max_new_tokens."""
    new_tokens: int
    prefill_flops: float
    decode_flops: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


@dataclass
class Plan:
    layout: dict
    sequence_parallel: bool
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
    step: StepTime
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rollout: RolloutCost | None = None
    """None without rollouts (rollout.fraction 0)."""

    @property
    def fits(self) -> bool:
        return not self.problems and self.worst_gib <= self.available_gib

    @property
    def step_seconds(self) -> float:
        """The estimated step time, communication, bubble and rollouts included."""
        return self.step.total

    @property
    def rollout_share(self) -> float:
        """The rollouts' share of the estimated step time."""
        return self.step.rollout / self.step.total

    def summary(self) -> dict:
        """The ranking's fields of this plan, for the JSON file."""
        return {
            "layout": self.layout,
            "sequence_parallel": self.sequence_parallel,
            "step_seconds_estimate": self.step.total,
            "step_seconds_lower_bound": self.step.compute,
            "step": asdict(self.step),
            "rollout_share": self.rollout_share,
            "worst_gib": self.worst_gib,
        }


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
    sequence_parallel: bool

    @property
    def element_bytes(self) -> int:
        """Bytes of one student weight or activation element."""
        return 2 if self.run.params_dtype == "bf16" else 4

    rollout_rows: list[int]
    """Rollout samples per step on each DP rank (the trainer's choice of positions)."""

    @property
    def rollout_rows_per_dp_rank(self) -> int:
        """On the busiest rank: the slowest sets the step."""
        return max(self.rollout_rows)


def make_setting(run: RunConfig, layout: ParallelLayout) -> Setting:
    tp = layout.tensor_model_parallel_size
    student = run.student.description("student")
    teacher = run.teacher_description()
    vocab = padded_vocab_size(student.vocab_size, tp)
    mbs = run.schedule.micro_batch_size
    # What the trainer decides on a GPU node, where Transformer Engine is present.
    te = run.performance.transformer_impl == "transformer_engine"
    return Setting(
        run,
        layout,
        student,
        teacher,
        count_parameters(student, vocab),
        count_parameters(teacher, padded_vocab_size(teacher.vocab_size, tp)) if teacher else None,
        vocab,
        max(run.schedule.global_batch_size // (mbs * layout.data_parallel_size), 1),
        sequence_parallel(run.performance, tp, te),
        rollout_rows(run, layout.data_parallel_size),
    )


def rollout_rows(run: RunConfig, dp: int) -> list[int]:
    """Each DP rank's rollout samples per step: the trainer rolls out the global batch's
    positions that ``is_rollout`` picks, and rank k holds the k-th slice of the batch."""
    share = run.schedule.global_batch_size // dp
    fraction = run.rollout.fraction
    return [
        sum(is_rollout(position, fraction) for position in range(k * share, (k + 1) * share))
        for k in range(dp)
    ]


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
    sp = setting.sequence_parallel
    layer_activation = activation_bytes_per_layer(student, mbs, seq, tp, element, sp)
    activations = in_flight * (student.num_layers // pp) * layer_activation
    if stage == 0:  # the embedding output, split along the sequence with SP
        embedding = element * mbs * seq * student.hidden_size
        activations += in_flight * embedding // (tp if sp else 1)
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
    kv_cache = kv_cache_bytes(
        student, student.num_layers // pp, tp, element, setting.rollout_rows_per_dp_rank, seq
    )
    return StageMemory(
        stage=stage,
        teacher_weights=2 * n_teacher / GIB,
        student_weights=element * n / GIB,
        student_grads=4 * n / GIB,
        optimizer=(master + 8) * n / optimizer_shards / GIB,
        activations=activations / GIB,
        logits_and_loss=logits / GIB,
        kv_cache=kv_cache / GIB,
    )


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


def tensor_parallel_seconds(setting: Setting, bandwidth: float) -> float:
    """TP communication of one micro-batch on one stage.

    With A = b*s*h*e bytes (one layer's output, e bytes per element), a model's pass
    all-reduces 2*L + 1 such tensors: two per layer (in the forward after the attention's
    and the MLP's row-parallel linear; in the backward the input gradients of the
    column-parallel QKV and FC1), plus one for the vocab-parallel embedding and output
    layer. The student makes two passes (forward, backward), the teacher one (forward).
    One ring all-reduce of A over t GPUs takes 2*(t-1)/t*A / bandwidth. With SP each
    all-reduce becomes a reduce-scatter plus an all-gather of (t-1)/t*A each: the same
    time (Megatron's extra all-gather of the input in the backward, for the weight
    gradient, runs beside the input-gradient GEMM and is not counted). The stages split
    the layers evenly: each carries 1/PP of the total.
    """
    layout, run = setting.layout, setting.run
    tokens = run.schedule.micro_batch_size * run.data.seq_length

    def passes(model: ModelDescription | None, count: int) -> float:
        if model is None:
            return 0.0
        return count * (2 * model.num_layers + 1) * tokens * model.hidden_size

    elements = passes(setting.student, 2) + passes(setting.teacher, 1)
    per_stage = elements * setting.element_bytes / layout.pipeline_model_parallel_size
    return ring_seconds(per_stage, layout.tensor_model_parallel_size, bandwidth, phases=2)


def pipeline_p2p_seconds(setting: Setting, bandwidth: float) -> float:
    """Pipeline send/receive of one micro-batch on one stage: the activation forward and its
    gradient backward, each b*s/t*(h_student + h_teacher)*e bytes (the teacher's hidden state
    rides along; t = TP with SP, which sends the sequence shard, else 1). A stage sends and
    receives at once (full-duplex links): two messages' time."""
    layout, run = setting.layout, setting.run
    if layout.pipeline_model_parallel_size == 1:
        return 0.0
    width = setting.student.hidden_size + (setting.teacher.hidden_size if setting.teacher else 0)
    shard = layout.tensor_model_parallel_size if setting.sequence_parallel else 1
    message = run.schedule.micro_batch_size * run.data.seq_length // shard * width
    return 2 * message * setting.element_bytes / bandwidth


def data_parallel_seconds(setting: Setting, bandwidth: float) -> float:
    """Once per step, over the student's parameters n on the largest stage: with the
    distributed optimizer a reduce-scatter of the fp32 gradients (4n bytes) and an all-gather
    of the updated parameters (e*n bytes), else an all-reduce of the gradients."""
    layout = setting.layout
    dp = layout.data_parallel_size
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    n = max(stage_parameters_per_gpu(setting.student_count, tp, pp, s) for s in range(pp))
    if setting.run.optimizer.use_distributed_optimizer:
        gradients = ring_seconds(4 * n, dp, bandwidth)
        return gradients + ring_seconds(setting.element_bytes * n, dp, bandwidth)
    return ring_seconds(4 * n, dp, bandwidth, phases=2)


def step_time(
    setting: Setting, flops_per_token: float, gpus_per_node: int, tflops: float, links: Interconnect
) -> StepTime:
    """The step's estimate (module doc): per-micro-batch stage times, m of them plus the
    PP - 1 of the 1F1B bubble, and the data-parallel exchange once."""
    layout, run = setting.layout, setting.run
    tp, pp, dp = (
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.data_parallel_size,
    )
    tokens = run.schedule.micro_batch_size * run.data.seq_length
    compute = tokens * flops_per_token / (tp * pp * tflops * 1e12)
    tp_comm = tensor_parallel_seconds(setting, links.bytes_per_second(tp, gpus_per_node))
    p2p = pipeline_p2p_seconds(setting, links.bytes_per_second(tp * dp * pp, gpus_per_node))
    m = setting.micro_batches
    return StepTime(
        compute=m * compute,
        tensor_parallel=m * tp_comm,
        pipeline_p2p=m * p2p,
        bubble=(pp - 1) * (compute + tp_comm + p2p),
        data_parallel=data_parallel_seconds(
            setting, links.bytes_per_second(tp * dp, gpus_per_node)
        ),
    )


def rollout_cost(setting: Setting, tflops: float, hbm_gb_s: float) -> RolloutCost | None:
    """The step's rollouts (module doc); None without them."""
    run, student, count = setting.run, setting.student, setting.student_count
    if not run.rollout.enabled:
        return None
    tp = setting.layout.tensor_model_parallel_size
    rows, new = setting.rollout_rows_per_dp_rank, run.rollout.max_new_tokens
    prompt = run.data.seq_length - new
    # One micro-batch: the stages take turns, so a forward costs the whole model per TP rank.
    flops_per_second, bytes_per_second = tp * tflops * 1e12, hbm_gb_s * 1e9
    weights = setting.element_bytes * matmul_parameters(student, count) / tp

    def roofline(flops: float, cache: float = 0.0) -> float:
        return max(flops / flops_per_second, (weights + cache) / bytes_per_second)

    prefill = prefill_flops(student, count, prompt)
    decode_seconds, decode = 0.0, 0
    for context in range(prompt + 1, prompt + new):  # the n-th token is never fed back
        flops = matmul_flops_per_token(student, count, context)
        cache = kv_cache_bytes(
            student, student.num_layers, tp, setting.element_bytes, rows, context
        )
        decode_seconds += roofline(rows * flops, cache)
        decode += flops
    return RolloutCost(
        rows=sum(setting.rollout_rows),
        rows_per_dp_rank=rows,
        prompt_tokens=prompt,
        new_tokens=new,
        prefill_flops=float(sum(setting.rollout_rows) * prefill),
        decode_flops=float(sum(setting.rollout_rows) * decode),
        prefill_seconds=roofline(rows * prefill) if rows else 0.0,
        decode_seconds=decode_seconds if rows else 0.0,
    )


def make_plan(
    run: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    tflops: float = 400.0,
    links: Interconnect | None = None,
    hbm_gb_s: float = HBM_GB_S,
) -> Plan:
    world = nodes * gpus_per_node
    layout, problems, warnings = layout_problems(run, world, gpus_per_node)
    setting = make_setting(run, layout)
    problems += sequence_parallel_problems(
        run, layout.tensor_model_parallel_size, setting.sequence_parallel
    )
    if run.performance.transformer_impl == "transformer_engine":
        problems += transformer_engine_problems(
            run, layout.tensor_model_parallel_size, setting.sequence_parallel
        )
    stages = [stage_memory(setting, stage) for stage in range(layout.pipeline_model_parallel_size)]
    worst = max(stages, key=lambda m: m.total)
    flops = training_flops_per_token(
        setting.student, setting.teacher, run.data.seq_length, layout.tensor_model_parallel_size
    )
    step = step_time(setting, flops, gpus_per_node, tflops, links or Interconnect())
    rollout = rollout_cost(setting, tflops, hbm_gb_s)
    if rollout is not None:
        step.rollout = rollout.seconds
    return Plan(
        layout={
            "TP": layout.tensor_model_parallel_size,
            "PP": layout.pipeline_model_parallel_size,
            "DP": layout.data_parallel_size,
        },
        sequence_parallel=setting.sequence_parallel,
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
        tokens_per_step=run.schedule.global_batch_size * run.data.seq_length,
        step=step,
        problems=problems,
        warnings=warnings,
        rollout=rollout,
    )


def rank_layouts(
    run: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    tflops: float = 400.0,
    links: Interconnect | None = None,
    hbm_gb_s: float = HBM_GB_S,
) -> list[Plan]:
    """Every TP x PP layout of these GPUs that passes the rules and fits, fastest first (ties:
    smaller TP, then smaller PP). The recipe's other settings are kept."""
    world = nodes * gpus_per_node
    plans = []
    for tp in (n for n in range(1, world + 1) if world % n == 0):
        for pp in (n for n in range(1, world // tp + 1) if world // tp % n == 0):
            candidate = dataclasses.replace(run, parallel=ParallelLayout(tp, pp))
            plan = make_plan(candidate, nodes, gpus_per_node, gpu_mem_gib, tflops, links, hbm_gb_s)
            if plan.fits:
                plans.append(plan)
    return sorted(plans, key=lambda p: (p.step_seconds, p.layout["TP"], p.layout["PP"]))


def layout_name(plan: Plan) -> str:
    lay = plan.layout
    return f"TP{lay['TP']} PP{lay['PP']} DP{lay['DP']}" + (" SP" if plan.sequence_parallel else "")


def format_step(plan: Plan) -> list[str]:
    step = plan.step
    rollout = f" + rollout {step.rollout:.2f}" if plan.rollout else ""
    lines = [
        f"compute: {plan.flops_per_token / 1e9:.1f} GFLOP per token, "
        f"{plan.tokens_per_step:,} tokens per step: at least {step.compute:.1f} s per step "
        "from compute alone (lower bound)",
        f"estimated step: {step.total:.1f} s = compute {step.compute:.2f} + TP comm "
        f"{step.tensor_parallel:.2f} + PP p2p {step.pipeline_p2p:.2f} + bubble {step.bubble:.2f}"
        f" + DP comm {step.data_parallel:.2f}{rollout} (an estimate from the model, not a "
        "measurement)",
    ]
    return lines + (format_rollout(plan.rollout, plan.rollout_share) if plan.rollout else [])


def format_rollout(cost: RolloutCost, share: float) -> list[str]:
    return [
        f"rollouts: {cost.rows} rows per step ({cost.rows_per_dp_rank} on the busiest DP rank), "
        f"prompts estimated at data.seq_length - max_new_tokens = {cost.prompt_tokens} tokens, "
        f"replies at max_new_tokens = {cost.new_tokens}",
        f"rollout: {cost.flops / 1e12:,.1f} TFLOP per step (prefill "
        f"{cost.prefill_flops / 1e12:,.1f} + decode {cost.decode_flops / 1e12:,.1f}), "
        f"{cost.seconds:.2f} s (prefill {cost.prefill_seconds:.2f} + decode "
        f"{cost.decode_seconds:.2f}; decoding at the nominal HBM bandwidth, latency left out: a "
        f"lower bound): {share:.1%} of the step",
    ]


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
    if plan.rollout:
        rows.append("kv_cache")
    lines = [
        f"world {plan.world_size} GPUs: TP={lay['TP']} PP={lay['PP']} DP={lay['DP']}"
        f"{', sequence parallel' if plan.sequence_parallel else ''}, "
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
    if plan.rollout:
        lines.append("(kv_cache is freed before the training forward: the total counts the larger")
        lines.append(" of kv_cache and activations + logits_and_loss)")
    lines += [
        "",
        f"worst stage {plan.worst_stage}: {plan.worst_gib:.2f} GiB of {plan.available_gib:.2f} GiB",
        *format_step(plan),
    ]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_ranking(plans: Sequence[Plan], chosen: Plan, top: int) -> str:
    """The fastest ``top`` fitting layouts; * marks the recipe's."""
    rollout = chosen.rollout is not None
    lines = [
        f"the {min(top, len(plans))} fastest of {len(plans)} layouts that fit; seconds per step "
        "estimated by the model, not measured (compute alone is a lower bound):",
        f"  {'layout':<20}{'step':>8}{'compute':>9}{'TP comm':>9}{'PP p2p':>8}{'bubble':>8}"
        f"{'DP comm':>9}"
        + (f"{'rollout':>9}{'share':>7}" if rollout else "")
        + f"{'worst GiB':>11}",
    ]
    for plan in plans[:top]:
        mark = "*" if plan.layout == chosen.layout else " "
        step = plan.step
        share = f"{step.rollout:>9.2f}{plan.rollout_share:>7.1%}" if rollout else ""
        lines.append(
            f"{mark} {layout_name(plan):<20}{step.total:>8.2f}{step.compute:>9.2f}"
            f"{step.tensor_parallel:>9.2f}{step.pipeline_p2p:>8.2f}{step.bubble:>8.2f}"
            f"{step.data_parallel:>9.2f}{share}{plan.worst_gib:>11.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpd_megatron.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, as for training")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument(
        "--hbm-gb-s",
        type=float,
        default=HBM_GB_S,
        help="GPU memory bandwidth, GB/s, for the rollouts' decoding (default: H100 SXM peak)",
    )
    defaults = Interconnect()
    parser.add_argument(
        "--intra-node-gb-s",
        type=float,
        default=defaults.intra_node_gb_s,
        help="GB/s per GPU and direction inside a node (default: H100 NVLink)",
    )
    parser.add_argument(
        "--inter-node-gb-s",
        type=float,
        default=defaults.inter_node_gb_s,
        help="GB/s per node and direction between nodes (default: 4 x 400 Gb/s InfiniBand)",
    )
    parser.add_argument("--top", type=int, default=TOP_LAYOUTS, help="layouts ranked")
    parser.add_argument("--json", help="also write the plan here")
    parser.add_argument(
        "--check-inputs",
        action="store_true",
        help="also check that the checkpoints and data the run reads exist (planning alone "
        "needs neither, nor their environment variables)",
    )
    return parser.parse_args(argv)


def load_for_planning(args: argparse.Namespace) -> RunConfig:
    """The recipe, strictly expanded and its inputs checked with --check-inputs; otherwise
    unset variables stay as written (the plan reads no path) and are named in a note."""
    if args.check_inputs:
        run = load_run_config(args.config, args.overrides)
        check_inputs(run)
        return run
    with unset_variables_kept() as unset:
        run = load_run_config(args.config, args.overrides)
    if unset:
        print(f"note: {', '.join(unset)} not set: planning reads no path (--check-inputs does)")
    return run


def write_json(path: str, plan: Plan, ranking: Sequence[Plan]) -> None:
    data = asdict(plan) | {
        "fits": plan.fits,
        "stage_totals_gib": [m.total for m in plan.stages],
        "step_seconds_estimate": plan.step.total,
        "step_seconds_lower_bound": plan.step.compute,
        "rollout_share": plan.rollout_share,
        "ranking": [candidate.summary() for candidate in ranking],
    }
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = load_for_planning(args)
    links = Interconnect(args.intra_node_gb_s, args.inter_node_gb_s)
    plan_args = (args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.tflops, links, args.hbm_gb_s)
    plan = make_plan(run, *plan_args)
    ranking = rank_layouts(run, *plan_args)
    print(format_table(plan))
    print()
    print(format_ranking(ranking, plan, args.top))
    if args.json:
        write_json(args.json, plan, ranking)
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
