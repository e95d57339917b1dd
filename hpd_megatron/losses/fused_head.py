"""The output layers fused into the loss: no [tokens, vocab/TP] logits for either model.

Each model hands the loss its final hidden states (after the final norm, Megatron's
``[s, b, h]``, or ``[s/TP, b, h]`` under sequence parallelism) and its output-layer
shard ``[V/TP, h]`` (the shared embedding when tied). The kernel (``kernel.py``) then
reads each chunk's logits as ``hidden rows @ shard^T``, computed into one reused
buffer per model, and runs the same rounds as on materialised logits, so losses and
samples equal that path up to the GEMM's rounding.

The backward recomputes each student chunk, forms its logit gradient and turns it into
the two gradients Megatron's ``ColumnParallelLinear`` would produce
(``LinearWithGradAccumulationAndAsyncCommunication.backward`` in
megatron/core/tensor_parallel/layers.py):

* the hidden states': ``grad @ shard``, summed over TP ranks by one all-reduce (a
  reduce-scatter along the sequence under sequence parallelism, whose forward
  all-gathered the hidden states);
* the weight's: ``grad^T @ hidden rows``, accumulated into Megatron DDP's fp32
  ``main_grad`` when the weight has one (returning a dummy gradient so that DDP's hook
  fires, zeroed under ``zero_out_wgrad`` for a tied embedding whose lookup also adds a
  gradient), else returned as an ordinary gradient.

The teacher's shard is moved onto the student's vocabulary layout once
(``align_teacher_weight``), so both models' chunks have the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hpd_megatron.losses.kernel import (
    Chunk,
    ChunkBuffers,
    ForwardRecord,
    LossPlan,
    call_of,
    compute_dtype,
    forward_chunks,
    logit_gradient_,
    subtract_point_weights_,
)
from hpd_megatron.losses.vocab_parallel import (
    TPGroup,
    VocabShard,
    realign_columns,
    shard_of_rank,
)

FUSED_CHUNK_ELEMENTS = 2**24
"""Default fused chunk: this many elements of the vocabulary shard (16 Mi: 64 MiB per fp32
buffer, e.g. 220 tokens of a 76,032-entry shard: rows enough for an efficient GEMM)."""

FUSED_BUFFERS = {"token": 4, "dense": 7}
"""fp32 [chunk, V/TP] buffers the fused path holds at its peak: token methods the student's
logits and scratch and the teacher's (forward), full-vocabulary methods both models'
logits, the scratch, log q, log p and the method's two temporaries; the backward holds
fewer. Each model dtype narrower than fp32 adds one [chunk, V/TP] GEMM output."""

PER_TOKEN_BYTES = 72
"""The O(tokens) state per position: 7 fp32 vectors, the sample id, the label, the row,
the inverse-CDF uniform (8 bytes each where long or float64)."""


@dataclass(frozen=True)
class OutputHead:
    """One model's input to the fused head: hidden states and its output-layer shard."""

    hidden: Tensor
    """[s, b, h] final hidden states ([s/TP, b, h] with sequence_parallel)."""
    weight: Tensor
    """[V/TP, h]: this rank's rows of the (padded) output layer."""
    sequence_parallel: bool = False


def fused_chunk_tokens(chunk_size: int | None, width: int) -> int:
    """Tokens per fused chunk: ``chunk_size``, or 16 Mi elements of a ``width`` shard."""
    if chunk_size is not None:
        return int(chunk_size)
    return max(1, FUSED_CHUNK_ELEMENTS // max(width, 1))


def fused_head_bytes(
    tokens: int,
    vocab_per_rank: int,
    student_hidden: int,
    teacher_hidden: int,
    *,
    dense: bool,
    chunk_size: int | None,
    element_bytes: int = 2,
    sequence_parallel_tp: int = 1,
) -> int:
    """Peak bytes of the fused head and loss on the last stage beyond the hidden states
    the model keeps anyway (what the planner's ``logits_and_loss`` counts):

    * the chunk workspace: ``FUSED_BUFFERS`` fp32 [chunk, V/TP] buffers, plus one in the
      model dtype for the GEMM's output when that is narrower than fp32;
    * ``PER_TOKEN_BYTES`` per position (the forward's O(tokens) state);
    * the hidden states' gradient [tokens, h_student] in the model dtype;
    * the dummy weight gradient handed to DDP's hook, [V/TP, h_student] in the model dtype;
    * for full-vocabulary methods, the teacher's hidden states saved for the backward;
    * under sequence parallelism, the all-gathered hidden states of both models.
    """
    chunk = min(fused_chunk_tokens(chunk_size, vocab_per_rank), tokens)
    fp32_buffers = FUSED_BUFFERS["dense" if dense else "token"]
    gemm_output = element_bytes if element_bytes < 4 else 0
    workspace = chunk * vocab_per_rank * (4 * fp32_buffers + gemm_output)
    total = workspace + tokens * PER_TOKEN_BYTES
    total += tokens * student_hidden * element_bytes  # the hidden states' gradient
    total += vocab_per_rank * student_hidden * element_bytes  # DDP's dummy weight gradient
    if dense:
        total += tokens * teacher_hidden * element_bytes // sequence_parallel_tp
    if sequence_parallel_tp > 1:
        total += tokens * (student_hidden + teacher_hidden) * element_bytes
    return total


# ---------------------------------------------------------------- the teacher's layout


def align_teacher_weight(
    weight: Tensor, student_width: int, vocab_size: int, tp: TPGroup
) -> Tensor:
    """The teacher's output-layer shard on the student's vocabulary layout: [student
    width, h], rows of the same ids as the student's shard, padding rows 0. Done once
    (the teacher is frozen); without a difference in padded width, the weight itself."""
    if weight.shape[0] == student_width:
        return weight.detach()
    source = shard_of_rank(weight.shape[0], vocab_size, tp.rank)
    target = shard_of_rank(student_width, vocab_size, tp.rank)
    with torch.no_grad():
        columns = weight.detach()[: source.real_width].t()
        moved = realign_columns(columns, weight.shape[0], student_width, vocab_size, tp)
        aligned = weight.new_zeros(student_width, weight.shape[1])
        aligned[: target.real_width] = moved.t()
    return aligned


# ---------------------------------------------------------------- sequence parallelism


def gather_sequence(hidden: Tensor, tp: TPGroup) -> Tensor:
    """All-gather [s/TP, b, h] along the sequence (the forward of upstream's
    ``gather_from_sequence_parallel_region``)."""
    if not tp.active:
        return hidden
    out = hidden.new_empty(hidden.shape[0] * tp.size, *hidden.shape[1:])
    # torch >= 2.10 names them *_single; older releases (and upstream Megatron) the others.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, hidden.contiguous(), group=tp.group)
    return out


def reduce_hidden_gradient(grad: Tensor, tp: TPGroup, sequence_parallel: bool) -> Tensor:
    """Sum the ranks' partial hidden gradients: an all-reduce, or with sequence parallelism
    a reduce-scatter back to [s/TP, b, h] (upstream's ``ColumnParallelLinear`` backward)."""
    if not tp.active:
        return grad
    if not sequence_parallel:
        dist.all_reduce(grad, group=tp.group)
        return grad
    out = grad.new_empty(grad.shape[0] // tp.size, *grad.shape[1:])
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, grad.contiguous(), group=tp.group)
    return out


# ---------------------------------------------------------------- chunks from a head


class HeadLogits:
    """A model's chunk logits computed from its hidden states and output-layer shard.

    ``hidden`` is [s, b, h] (gathered); the loss's rows are positions of the batch-first
    labels [b, s], so row r = b_i * s + s_i reads hidden row s_i * b + b_i.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, real_width: int, rows: Tensor) -> None:
        seq, batch = hidden.shape[0], hidden.shape[1]
        self.hidden = hidden.reshape(seq * batch, hidden.shape[2])
        self.weight = weight[:real_width]
        self.hidden_rows = (rows % seq) * batch + torch.div(rows, seq, rounding_mode="floor")

    def rows(self, chunk: Chunk, buffers: ChunkBuffers, name: str) -> Tensor:
        hidden = buffers.get(f"{name}_hidden", chunk.n, self.hidden.shape[1], self.hidden.dtype)
        torch.index_select(self.hidden, 0, self.hidden_rows[chunk.part], out=hidden)
        logits = buffers.get(name, chunk.n, self.weight.shape[0])
        return _block_logits(hidden, self.weight, logits, buffers)


def _head_logits(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    plan: LossPlan,
    rows: Tensor,
    sequence_parallel: bool,
) -> tuple[HeadLogits, HeadLogits | None]:
    """Both models' ``HeadLogits`` (the teacher's when given), their hidden states first
    gathered along the sequence under sequence parallelism."""

    def head(hidden: Tensor, weight: Tensor, real_width: int) -> HeadLogits:
        full = gather_sequence(hidden, plan.tp) if sequence_parallel else hidden
        return HeadLogits(full, weight, real_width, rows)

    student = head(hidden, weight, plan.student.real_width)
    if teacher_hidden is None:
        return student, None
    return student, head(teacher_hidden, teacher_weight, plan.teacher.real_width)


def _block_logits(hidden: Tensor, weight: Tensor, out: Tensor, buffers: ChunkBuffers) -> Tensor:
    """``hidden @ weight^T`` into ``out`` (the compute dtype); for models narrower than it,
    the GEMM in the model's dtype, as the output layer computes it."""
    if weight.dtype == out.dtype and hidden.dtype == out.dtype:
        return torch.mm(hidden, weight.t(), out=out)
    product = buffers.get("gemm", out.shape[0], out.shape[1], weight.dtype)
    return out.copy_(torch.mm(hidden.to(weight.dtype), weight.t(), out=product))


# ---------------------------------------------------------------- the weight's gradient


@cache
def _apex_weight_gradient() -> Any:
    """Apex's fused fp32 weight-gradient accumulation, or None (the CPU has none)."""
    try:
        import fused_weight_gradient_mlp_cuda
    except ImportError:
        return None
    return fused_weight_gradient_mlp_cuda


class WeightGradient:
    """Where the student's output-layer gradient accumulates, in fp32: Megatron DDP's
    ``main_grad`` when the weight has one (upstream's gradient-accumulation fusion), else a
    buffer handed to autograd."""

    def __init__(self, weight: Tensor, real_width: int, dtype: torch.dtype) -> None:
        self.parameter = weight
        self.into_main_grad = hasattr(weight, "main_grad") and hasattr(
            weight, "grad_added_to_main_grad"
        )
        if self.into_main_grad:
            self.real = weight.main_grad[:real_width]
        else:
            self.full = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
            self.real = self.full[:real_width]

    def accumulate(self, columns: slice, grad: Tensor, exact: Tensor, hidden: Tensor) -> None:
        """rows ``columns`` += grad^T @ hidden (``exact``: the same gradient in fp32)."""
        target = self.real[columns]
        if grad.dtype == target.dtype and hidden.dtype == target.dtype:
            target.addmm_(grad.t(), hidden)
            return
        apex = _apex_weight_gradient()
        if apex is not None and target.dtype == torch.float32 and target.is_cuda:
            apex.wgrad_gemm_accum_fp32(hidden.contiguous(), grad.contiguous(), target)
            return
        target.addmm_(exact.t().to(target.dtype), hidden.to(target.dtype))

    def for_autograd(self) -> Tensor:
        """What autograd gets for the weight (upstream's dummy when DDP's main_grad has it)."""
        if not self.into_main_grad:
            return self.full.to(self.parameter.dtype)
        # Fresh, so that autograd takes it as .grad without a copy; zeroed for a tied
        # embedding, whose lookup gradient autograd adds to it before DDP's hook reads it.
        zero = getattr(self.parameter, "zero_out_wgrad", False)
        self.parameter.grad_added_to_main_grad = True
        make = torch.zeros if zero else torch.empty
        return make(self.parameter.shape, dtype=self.parameter.dtype, device=self.parameter.device)


MIN_BLOCK_COLUMNS = 128
"""The backward's narrowest vocabulary block: the GEMMs stay in their wide-matrix kernels."""


def _block_columns(real_width: int, rows: int, elements: int) -> list[slice]:
    """Vocabulary blocks of the backward: as many elements as a forward chunk, over all rows
    (at least ``MIN_BLOCK_COLUMNS`` columns)."""
    width = max(MIN_BLOCK_COLUMNS, elements // max(rows, 1))
    return [slice(c, min(c + width, real_width)) for c in range(0, real_width, width)]


def fused_backward(
    grad_scale: float,
    student: HeadLogits,
    teacher: HeadLogits | None,
    saved: dict[str, Tensor],
    plan: LossPlan,
    weight_grad: WeightGradient,
    dtype: torch.dtype,
) -> Tensor:
    """The student's hidden-state gradient at the supervised rows [rows, h]; the weight's
    accumulates in ``weight_grad``.

    Blocked by vocabulary, not by tokens: each block recomputes [all supervised rows, block]
    logits, so its two gradient GEMMs contract over every row at once and each block of
    the weight's gradient is written once (token chunks would read and write the whole
    [V/TP, h] gradient per chunk).
    """
    rows, shard = saved["rows"], plan.student
    hidden = student.hidden[student.hidden_rows]
    t_hidden = teacher.hidden[teacher.hidden_rows] if plan.dense else None
    # Summed over vocabulary blocks in float64: the blocks' partial products cancel (HPD's
    # weights reach tens), and a float32 sum would add their rounding to the GEMM's.
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    buffers = ChunkBuffers(max(rows.numel(), 1), rows.device, dtype)
    every = slice(0, rows.numel())
    points = []
    if not plan.dense:
        points = [(saved["labels"][rows], saved["coef_y"]), (saved["samples"], saved["coef_s"])]
    elements = plan.chunk_size * shard.width
    for columns in _block_columns(shard.real_width, rows.numel(), elements):
        width, weight = columns.stop - columns.start, student.weight[columns]
        logits = _block_logits(hidden, weight, buffers.get("z", rows.numel(), width), buffers)
        t_logits = None
        if plan.dense:
            t_out = buffers.get("t", rows.numel(), width)
            t_logits = _block_logits(t_hidden, teacher.weight[columns], t_out, buffers)
        out = buffers.get("grad", rows.numel(), width)
        logit_gradient_(out, logits, t_logits, every, saved, plan, grad_scale, buffers)
        block = VocabShard(shard.start + columns.start, width, width)
        subtract_point_weights_(out, points, block, grad_scale)
        grad = out
        if weight.dtype != out.dtype:  # the GEMMs in the model's dtype, as the output layer's
            grad = buffers.get("grad_cast", rows.numel(), width, weight.dtype).copy_(out)
        grad_hidden += torch.mm(grad, weight)
        weight_grad.accumulate(columns, grad, out, hidden)
    return grad_hidden


# ---------------------------------------------------------------- the autograd function


@dataclass
class HeadInputs:
    """What the fused function needs besides the tensors (the same on all TP ranks)."""

    plan: LossPlan
    sequence_parallel: bool
    record: ForwardRecord


class FusedHeadDistillation(torch.autograd.Function):
    """loss_sum from both models' hidden states and output shards; gradients to the
    student's hidden states and output weight only."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        labels: Tensor,
        sampled_tokens: Tensor | None,
        inputs: HeadInputs,
    ) -> Tensor:
        plan, sp = inputs.plan, inputs.sequence_parallel
        dtype = compute_dtype(hidden.dtype)
        flat = labels.reshape(-1)
        rows = (flat != plan.ignore_index).nonzero().squeeze(1)
        student, teacher = _head_logits(
            hidden, weight, teacher_hidden, teacher_weight, plan, rows, sp
        )
        call = call_of(plan, student, teacher, flat, rows, sampled_tokens, dtype, hidden.device)
        loss_sum, saved, filled = forward_chunks(call)
        inputs.record.__dict__.update(filled.__dict__)
        ctx.inputs, ctx.names = inputs, list(saved)
        keep = (teacher_hidden, teacher_weight) if plan.dense else (None, None)
        ctx.save_for_backward(hidden, weight, *keep, *saved.values())
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor):
        hidden, weight, teacher_hidden, teacher_weight, *rest = ctx.saved_tensors
        saved, plan, sp = dict(zip(ctx.names, rest)), ctx.inputs.plan, ctx.inputs.sequence_parallel
        rows, dtype = saved["rows"], compute_dtype(hidden.dtype)
        student, teacher = _head_logits(
            hidden, weight, teacher_hidden, teacher_weight, plan, rows, sp
        )
        weight_grad = WeightGradient(weight, plan.student.real_width, dtype)
        at_rows = fused_backward(
            float(grad_output), student, teacher, saved, plan, weight_grad, dtype
        )
        grad_full = torch.zeros_like(student.hidden)
        grad_full.index_copy_(0, student.hidden_rows, at_rows.to(grad_full.dtype))
        gathered = (hidden.shape[0] * (plan.tp.size if sp else 1), *hidden.shape[1:])
        grad_hidden = reduce_hidden_gradient(grad_full.view(gathered), plan.tp, sp)
        return grad_hidden, weight_grad.for_autograd(), None, None, None, None, None
