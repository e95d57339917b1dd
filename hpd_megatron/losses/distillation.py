"""``distillation_loss``: HPD and the divergences it unifies, on vocab-parallel logits.

Inputs are what Megatron's output layer produces: each TP rank holds its slice of the
padded vocabulary, ``[..., vocab/TP]`` with any leading dims ([seq, batch] or
[batch, seq]), in bf16, fp32 or fp64. Labels are ALREADY SHIFTED: ``labels[t]`` is the
token that ``logits[t]`` predicts (for next-token prediction, the input token at t + 1),
with -100 on prompt and padding positions. Labels, sampled tokens and the seed must be
the same on every TP rank (Megatron broadcasts the batch within the TP group).

Reported values (``loss``) per supervised token, then the token mean (or sum):

=======  ====================================================================
method   value                                     gradient (w.r.t. student logits)
=======  ====================================================================
sft      -log q(y)                                 of the value
hpd      -(A log q(y) + B [yh != y] log q(yh))     with A, B held constant
opd      log q(y) - log p(y)   (y: student's own)  of -w log q(y), w = log p(y) - log q(y) held
fkl      KL(p || q)                                of the value
rkl      KL(q || p)                                of the value
skl      KL(p || a p + (1-a) q)    (alpha=a)       of the value
srkl     KL(q || a q + (1-a) p)    (alpha=a)       of the value
tvd      1/2 sum_v |p - q|                         of the value
jsd      b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q  (beta=b)   of the value
=======  ====================================================================

For the full-vocabulary methods the gradient of the surrogate
``-sum_v sg[w(v)] log q(v)`` equals the gradient of the divergence itself, so the value
reported is the divergence. For HPD the value is the surrogate objective. For ``opd``
(on-policy distillation, for rollouts, where the label is the student's own sample) the
value is the one-sample estimate of KL(q || p); over y ~ q, the surrogate's gradient
averages to that divergence's gradient.

Reduction: ``"mean"`` divides by the number of supervised tokens of this call (0 when
there are none); ``"sum"`` returns the sum so that Megatron's schedule with
``calculate_per_token_loss`` can divide by the global batch's token count, which is
the HPD objective's token mean over the whole global batch (``num_tokens`` is in the
diagnostics).

Diagnostics: detached scalars, identical on all TP ranks: ``loss`` (the token mean),
``loss_sum``, ``num_tokens``, ``cross_entropy`` (data-token CE), for full-vocab methods
``divergence`` (mean), for HPD the shares ``hpd/sample_differs`` (yh != y),
``hpd/a_negative`` (A < 0), ``hpd/b_active`` (m2 and yh != y: the sample term
contributes), ``hpd/m1_and_m2`` and the means ``hpd/a_mean``, ``hpd/b_mean``, for
``opd`` the mean reward ``opd/reward_mean`` (log p(y) - log q(y)) and the share
``opd/reward_positive`` (reward > 0: the teacher likes the token more than the student).
Shares and means are over this call's supervised tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from hpd_megatron.losses.fused_head import (
    FusedHeadDistillation,
    HeadInputs,
    OutputHead,
    fused_chunk_tokens,
)
from hpd_megatron.losses.kernel import (
    DEFAULT_CHUNK_ELEMENTS,
    ForwardRecord,
    LossPlan,
    VocabParallelDistillation,
    forward_pass,
)
from hpd_megatron.losses.methods import (
    FULL_VOCAB_METHODS,
    METHODS,
    TOKEN_METHODS,
    FullVocabMethod,
    HpdB,
    MethodName,
    TokenMethod,
    TokenWeights,
    hpd_variant,
)
from hpd_megatron.losses.sampling import SamplingOptions, base_seed, draw_uniforms
from hpd_megatron.losses.vocab_parallel import (
    FROM_PARALLEL_STATE,
    TPGroup,
    TPGroupArg,
    resolve_tp_group,
    vocab_shard,
)

IGNORE_INDEX = -100

Reduction = Literal["mean", "sum"]


def _check_ids(name: str, ids: Tensor, supervised: Tensor, vocab_size: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name}: expected an integer tensor of token ids, got {ids.dtype}")
    bad = supervised & ((ids < 0) | (ids >= vocab_size))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: id {int(ids[where])} at {where} is outside the real vocabulary "
            f"[0, {vocab_size}) (use {IGNORE_INDEX} for positions without a loss)"
        )


def _check_logits(name: str, logits: Tensor, leading: torch.Size) -> None:
    if not torch.is_floating_point(logits):
        raise ValueError(f"{name}: expected floating-point logits, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != leading:
        expected = f"labels {tuple(leading)} + [vocab/TP]"
        raise ValueError(f"{name}: shape {tuple(logits.shape)} does not match {expected}")


def _check_device(name: str, tensor: Tensor, logits: Tensor) -> None:
    # A host tensor beside GPU logits would otherwise fail deep in a kernel, unnamed.
    if tensor.device != logits.device:
        raise ValueError(
            f"{name}: on {tensor.device}, but student_logits are on {logits.device}; move "
            "every input of the loss to the model's device"
        )


def _check_shape(name: str, tensor: Tensor, labels: Tensor) -> None:
    if tensor.shape != labels.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} != labels {tuple(labels.shape)}")


def _chunk_tokens(chunk_size: int | None, widest: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(widest, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _sample_source(
    method: FullVocabMethod | TokenMethod,
    sampling: SamplingOptions,
    labels: Tensor,
    vocab_size: int,
    device: torch.device,
    tp: TPGroup,
) -> tuple[Tensor | None, int | None]:
    """(uniforms, Gumbel seed) of a method that draws its sample here; checks given inputs."""
    if not method.needs_sample:
        return None, None
    if sampling.sampled_tokens is not None:
        _check_shape("sampled_tokens", sampling.sampled_tokens, labels)
        supervised = labels != IGNORE_INDEX
        _check_ids("sampled_tokens", sampling.sampled_tokens, supervised, vocab_size)
        return None, None
    if sampling.sampler == "gumbel":
        return None, base_seed(sampling.generator, sampling.seed)
    if sampling.uniforms is not None:
        _check_shape("uniforms", sampling.uniforms, labels)
        return sampling.uniforms.reshape(-1).to(device, torch.float64), None
    return draw_uniforms(labels.numel(), device, tp, sampling.generator, sampling.seed), None


def _plan(
    method: FullVocabMethod | TokenMethod,
    param: float,
    labels: Tensor,
    shards: tuple[tuple[str, int], tuple[str, int] | None],
    *,
    vocab_size: int,
    tp_group: TPGroupArg,
    chunk_tokens: Callable[[int], int],
    sampling: SamplingOptions,
) -> LossPlan:
    """Resolve the TP group, each model's shard (from its ``(name, width)``), the chunk size
    (``chunk_tokens(widest shard)``) and the sample source; checks the ids."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    _check_ids("labels", labels, labels != IGNORE_INDEX, vocab_size)
    tp = resolve_tp_group(tp_group)
    (s_name, s_width), teacher_shard = shards
    student = vocab_shard(s_name, s_width, vocab_size, tp)
    teacher = None if teacher_shard is None else vocab_shard(*teacher_shard, vocab_size, tp)
    uniforms, gumbel_seed = _sample_source(method, sampling, labels, vocab_size, labels.device, tp)
    widest = max(student.width, teacher.width if teacher is not None else 0)
    return LossPlan(
        method=method,
        param=param,
        vocab_size=vocab_size,
        tp=tp,
        student=student,
        teacher=teacher,
        chunk_size=chunk_tokens(widest),
        ignore_index=IGNORE_INDEX,
        sampler=sampling.sampler,
        uniforms=uniforms,
        gumbel_seed=gumbel_seed,
    )


def _logits_plan(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    method: FullVocabMethod | TokenMethod,
    param: float,
    *,
    vocab_size: int,
    tp_group: TPGroupArg,
    chunk_size: int | None,
    sampling: SamplingOptions,
) -> LossPlan:
    """Check materialised logits against the labels, then plan."""
    _check_logits("student_logits", student_logits, labels.shape)
    _check_device("labels", labels, student_logits)
    teacher = None
    if teacher_logits is not None:
        _check_logits("teacher_logits", teacher_logits, labels.shape)
        _check_device("teacher_logits", teacher_logits, student_logits)
        teacher = ("teacher_logits", teacher_logits.shape[-1])
    return _plan(
        method,
        param,
        labels,
        (("student_logits", student_logits.shape[-1]), teacher),
        vocab_size=vocab_size,
        tp_group=tp_group,
        chunk_tokens=partial(_chunk_tokens, chunk_size),
        sampling=sampling,
    )


def _method(
    method: str,
    reduction: str,
    teacher: Tensor | OutputHead | None,
    alpha: float,
    beta: float,
    hpd_b: HpdB = "reference",
    hpd_b_floor: float = -1.0,
    teacher_name: str = "teacher_logits",
) -> tuple[FullVocabMethod | TokenMethod, float]:
    """The method's spec and its coefficient; checks the teacher is there if needed."""
    spec = FULL_VOCAB_METHODS.get(method) or TOKEN_METHODS.get(method)
    if method == "hpd":
        spec = hpd_variant(hpd_b, hpd_b_floor)
    if spec is None:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if spec.needs_teacher and teacher is None:
        raise ValueError(f"{teacher_name}: method {method!r} needs the teacher's logits, got None")
    param = {"alpha": alpha, "beta": beta}.get(getattr(spec, "param", None) or "", 0.0)
    if not 0.0 <= param <= 1.0:
        raise ValueError(f"{spec.param} must be in [0, 1], got {param}")
    return spec, param


def _mean(x: Tensor, count: int) -> Tensor:
    return x.double().sum().div(max(count, 1)).float()


def _diagnostics(loss_sum: Tensor, record: ForwardRecord, dense: bool) -> dict[str, Tensor]:
    count = int(record.rows.numel())
    diagnostics = {
        "loss": _mean(record.values, count),
        "loss_sum": loss_sum.detach().float(),
        "num_tokens": torch.tensor(count, device=loss_sum.device),
        "cross_entropy": _mean(record.cross_entropy, count),
    }
    if dense:
        diagnostics["divergence"] = diagnostics["loss"]
    for name, per_token in record.stats.items():
        diagnostics[name] = _mean(per_token, count)
    return diagnostics


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    method: MethodName = "hpd",
    *,
    vocab_size: int,
    alpha: float = 0.1,
    beta: float = 0.5,
    hpd_b: HpdB = "reference",
    hpd_b_floor: float = -1.0,
    reduction: Reduction = "mean",
    tp_group: TPGroupArg = FROM_PARALLEL_STATE,
    chunk_size: int | None = None,
    sampling: SamplingOptions = SamplingOptions(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Distillation loss over supervised tokens, exact under tensor parallelism.

    Args:
        student_logits: this rank's vocab-parallel shard ``[..., V_s/TP]`` (requires grad).
        teacher_logits: the teacher's shard ``[..., V_t/TP]`` (its padded width may differ
            from the student's); never receives a gradient. None only for ``"sft"``.
        labels: ``[...]`` already-shifted target ids, -100 where there is no loss.
        method, reduction: see the module docstring.
        vocab_size: the real (tokenizer) vocabulary; columns at or beyond it are padding.
        alpha: skew of ``skl``/``srkl``; beta: mixture weight of ``jsd``.
        hpd_b, hpd_b_floor: HPD's sample term B: ``reference`` (the paper's), ``drop``
            (B = 0) or ``bound`` (max(B, hpd_b_floor)); see ``methods.hpd_token_weights``.
        tp_group: the TP group; default Megatron's (none if uninitialised); None: no TP.
        chunk_size: tokens per chunk (default: 4 Mi elements of the widest shard).
        sampling: where HPD's sample comes from.

    Returns:
        ``(loss, diagnostics)``: the loss (fp32, fp64 for fp64 logits) and the detached
        scalars listed in the module docstring.
    """
    spec, param = _method(method, reduction, teacher_logits, alpha, beta, hpd_b, hpd_b_floor)
    teacher = teacher_logits.detach() if spec.needs_teacher else None
    plan = _logits_plan(
        student_logits,
        teacher,
        labels,
        spec,
        param,
        vocab_size=vocab_size,
        tp_group=tp_group,
        chunk_size=chunk_size,
        sampling=sampling,
    )
    record = ForwardRecord()
    loss_sum = VocabParallelDistillation.apply(
        student_logits, teacher, labels, sampling.sampled_tokens, plan, record
    )
    loss = loss_sum if reduction == "sum" else loss_sum / max(int(record.rows.numel()), 1)
    return loss, _diagnostics(loss_sum, record, plan.dense)


def _check_head(name: str, head: OutputHead, labels: Tensor, tp_size: int) -> None:
    """The hidden states [s, b, h] (s/TP with sequence parallelism) against the labels
    [b, s], and the weight [V/TP, h] against them."""
    hidden, weight = head.hidden, head.weight
    seq = hidden.shape[0] * (tp_size if head.sequence_parallel else 1) if hidden.dim() == 3 else -1
    if (
        hidden.dim() != 3
        or labels.dim() != 2
        or (seq, hidden.shape[1]) != tuple(labels.shape[::-1])
    ):
        raise ValueError(
            f"{name}.hidden: shape {tuple(hidden.shape)} is not [s, b, h] for labels [b, s] = "
            f"{tuple(labels.shape)}"
            + (" (s/TP per rank: sequence parallel)" if head.sequence_parallel else "")
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{name}.weight: shape {tuple(weight.shape)} is not [vocab/TP, {hidden.shape[2]}]"
        )
    for part, tensor in (("hidden", hidden), ("weight", weight)):
        _check_device(f"{name}.{part}", tensor, labels)


def fused_distillation_loss(
    student: OutputHead,
    teacher: OutputHead | None,
    labels: Tensor,
    method: MethodName = "hpd",
    *,
    vocab_size: int,
    alpha: float = 0.1,
    beta: float = 0.5,
    hpd_b: HpdB = "reference",
    hpd_b_floor: float = -1.0,
    reduction: Reduction = "mean",
    tp_group: TPGroupArg = FROM_PARALLEL_STATE,
    chunk_size: int | None = None,
    sampling: SamplingOptions = SamplingOptions(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """``distillation_loss`` with each model's output layer fused in (``fused_head.py``).

    Takes each model's final hidden states and output-layer shard instead of its logits;
    labels are batch-first [b, s] as Megatron's batch, the hidden states sequence-first as
    its decoder's output. The teacher's shard must be on the student's layout
    (``align_teacher_weight``) for the full-vocabulary methods. Gradients reach the
    student's hidden states and weight (DDP's ``main_grad`` when it has one). Same values,
    samples and diagnostics as ``distillation_loss`` on the materialised logits, up to the
    GEMM's rounding.
    """
    spec, param = _method(
        method, reduction, teacher, alpha, beta, hpd_b, hpd_b_floor, teacher_name="teacher"
    )
    teacher = teacher if spec.needs_teacher else None
    t_shard = None if teacher is None else ("teacher.weight", teacher.weight.shape[0])
    plan = _plan(
        spec,
        param,
        labels,
        (("student.weight", student.weight.shape[0]), t_shard),
        vocab_size=vocab_size,
        tp_group=tp_group,
        chunk_tokens=partial(fused_chunk_tokens, chunk_size),
        sampling=sampling,
    )
    for name, head in (("student", student), ("teacher", teacher)):
        if head is not None:
            _check_head(name, head, labels, plan.tp.size)
    if plan.realign:
        raise ValueError(
            f"teacher.weight: padded width {teacher.weight.shape[0]} differs from the "
            f"student's {student.weight.shape[0]}; move it onto the student's layout once "
            "with fused_head.align_teacher_weight"
        )
    record = ForwardRecord()
    loss_sum = FusedHeadDistillation.apply(
        student.hidden,
        student.weight,
        None if teacher is None else teacher.hidden.detach(),
        None if teacher is None else teacher.weight.detach(),
        labels,
        sampling.sampled_tokens,
        HeadInputs(plan, student.sequence_parallel, record),
    )
    loss = loss_sum if reduction == "sum" else loss_sum / max(int(record.rows.numel()), 1)
    return loss, _diagnostics(loss_sum, record, plan.dense)


def _no_weights(point) -> TokenWeights:
    zeros = torch.zeros_like(point.logq_y)
    return TokenWeights(zeros, zeros, zeros, {})


_SAMPLE_ONLY = TokenMethod("sample", _no_weights, needs_teacher=False, needs_sample=True, value="")


@torch.no_grad()
def sample_student_tokens(
    student_logits: Tensor,
    labels: Tensor,
    *,
    vocab_size: int,
    tp_group: TPGroupArg = FROM_PARALLEL_STATE,
    chunk_size: int | None = None,
    sampling: SamplingOptions = SamplingOptions(),
) -> Tensor:
    """One token per supervised position from the student's fp32 softmax (real vocab only).

    Exactly the sampler ``distillation_loss(method="hpd")`` uses: with the same
    ``sampling`` (and chunk size) it returns the tokens HPD draws. Returns a tensor shaped
    like ``labels`` with -100 at unsupervised positions; identical on all TP ranks.
    """
    if sampling.sampled_tokens is not None:
        raise ValueError("sampling.sampled_tokens: sample_student_tokens draws the tokens itself")
    plan = _logits_plan(
        student_logits,
        None,
        labels,
        _SAMPLE_ONLY,
        0.0,
        vocab_size=vocab_size,
        tp_group=tp_group,
        chunk_size=chunk_size,
        sampling=sampling,
    )
    _, _, record = forward_pass(student_logits, None, labels, None, plan)
    out = torch.full(labels.shape, IGNORE_INDEX, dtype=torch.long, device=labels.device)
    out.view(-1)[record.rows] = record.sampled
    return out
