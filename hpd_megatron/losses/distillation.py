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
fkl      KL(p || q)                                of the value
rkl      KL(q || p)                                of the value
skl      KL(p || a p + (1-a) q)    (alpha=a)       of the value
srkl     KL(q || a q + (1-a) p)    (alpha=a)       of the value
tvd      1/2 sum_v |p - q|                         of the value
jsd      b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q  (beta=b)   of the value
=======  ====================================================================

For the full-vocabulary methods the gradient of the surrogate
``-sum_v sg[w(v)] log q(v)`` equals the gradient of the divergence itself, so the value
reported is the divergence. For HPD the value is the surrogate objective.

Reduction: ``"mean"`` divides by the number of supervised tokens of this call (0 when
there are none); ``"sum"`` returns the sum so that Megatron's schedule with
``calculate_per_token_loss`` can divide by the global batch's token count, which is
the HPD objective's token mean over the whole global batch (``num_tokens`` is in the
diagnostics).
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    TokenMethod,
    TokenWeights,
)
from hpd_megatron.losses.sampling import SAMPLERS, base_seed, draw_uniforms
from hpd_megatron.losses.vocab_parallel import (
    FROM_PARALLEL_STATE,
    TPGroupArg,
    resolve_tp_group,
    vocab_shard,
)

IGNORE_INDEX = -100


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
        raise ValueError(
            f"{name}: shape {tuple(logits.shape)} does not match labels {tuple(leading)} + [vocab/TP]"
        )


def _chunk_tokens(chunk_size: int | None, widest: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(widest, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _plan(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    method,
    vocab_size: int,
    param: float,
    tp_group: TPGroupArg,
    sampled_tokens: Tensor | None,
    generator: torch.Generator | None,
    seed: int | None,
    sampler: str,
    chunk_size: int | None,
    given_uniforms: Tensor | None = None,
) -> LossPlan:
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    _check_logits("student_logits", student_logits, labels.shape)
    supervised = labels != IGNORE_INDEX
    _check_ids("labels", labels, supervised, vocab_size)
    tp = resolve_tp_group(tp_group)
    student = vocab_shard("student_logits", student_logits.shape[-1], vocab_size, tp)
    teacher = None
    if teacher_logits is not None:
        _check_logits("teacher_logits", teacher_logits, labels.shape)
        teacher = vocab_shard("teacher_logits", teacher_logits.shape[-1], vocab_size, tp)
    needs_sample = isinstance(method, TokenMethod) and method.needs_sample
    uniforms, gumbel_seed = None, None
    if needs_sample:
        if sampled_tokens is not None:
            if sampled_tokens.shape != labels.shape:
                raise ValueError(
                    f"sampled_tokens: shape {tuple(sampled_tokens.shape)} != labels {tuple(labels.shape)}"
                )
            _check_ids("sampled_tokens", sampled_tokens, supervised, vocab_size)
        elif sampler == "inverse_cdf" and given_uniforms is not None:
            if given_uniforms.shape != labels.shape:
                raise ValueError(
                    f"uniforms: shape {tuple(given_uniforms.shape)} != labels {tuple(labels.shape)}"
                )
            uniforms = given_uniforms.reshape(-1).to(student_logits.device, torch.float64)
        elif sampler == "inverse_cdf":
            uniforms = draw_uniforms(labels.numel(), student_logits.device, tp, generator, seed)
        else:
            gumbel_seed = base_seed(generator, seed)
    widest = max(student.width, teacher.width if teacher is not None else 0)
    return LossPlan(
        method=method,
        param=param,
        vocab_size=vocab_size,
        tp=tp,
        student=student,
        teacher=teacher,
        chunk_size=_chunk_tokens(chunk_size, widest),
        ignore_index=IGNORE_INDEX,
        sampler=sampler,
        uniforms=uniforms,
        gumbel_seed=gumbel_seed,
    )


def _mean(x: Tensor, count: int) -> Tensor:
    return x.double().sum().div(max(count, 1)).float()


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    method: str = "hpd",
    *,
    vocab_size: int,
    alpha: float = 0.1,
    beta: float = 0.5,
    reduction: str = "mean",
    tp_group: TPGroupArg = FROM_PARALLEL_STATE,
    sampled_tokens: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sampler: str = "inverse_cdf",
    chunk_size: int | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Distillation loss over supervised tokens, exact under tensor parallelism.

    Args:
        student_logits: this rank's vocab-parallel shard ``[..., V_s/TP]`` (requires grad).
        teacher_logits: the teacher's shard ``[..., V_t/TP]`` (padded widths may differ
            from the student's); never receives a gradient. None only for ``"sft"``.
        labels: ``[...]`` already-shifted target ids, -100 where there is no loss.
        method: one of ``sft, hpd, fkl, rkl, skl, srkl, tvd, jsd``.
        vocab_size: the real (tokenizer) vocabulary size; columns at or beyond it are
            padding and excluded from every softmax.
        alpha: skew of ``skl``/``srkl``; beta: mixture weight of ``jsd``.
        reduction: ``"mean"`` (token mean) or ``"sum"``.
        tp_group: the TP process group; default Megatron's (none if uninitialised);
            None means no tensor parallelism.
        sampled_tokens: HPD's yh per position (same shape as labels), instead of sampling.
        generator, seed: where HPD's sample comes from; must be the same on all TP ranks
            (neither: torch's default generator, still made identical across TP ranks
            for the inverse-CDF sampler by a broadcast from TP rank 0).
        sampler: ``"inverse_cdf"`` (default) or ``"gumbel"``; see ``sampling.py``.
        chunk_size: tokens per chunk (default: 4 Mi elements of the widest shard).

    Returns:
        ``(loss, diagnostics)``: the loss (fp32, fp64 for fp64 logits) and a dict of
        detached scalars, identical on all TP ranks: ``loss`` (same value), ``loss_sum``,
        ``num_tokens``, ``cross_entropy`` (data-token CE), for full-vocab methods
        ``divergence`` (mean), for HPD the shares ``hpd/sample_differs`` (yh != y),
        ``hpd/a_negative`` (A < 0), ``hpd/b_active`` (m2 and yh != y: the sample term
        contributes), ``hpd/m1_and_m2`` and the means ``hpd/a_mean``, ``hpd/b_mean``.
        Shares and means are over this call's supervised tokens.
    """
    if method in FULL_VOCAB_METHODS:
        spec = FULL_VOCAB_METHODS[method]
    elif method in TOKEN_METHODS:
        spec = TOKEN_METHODS[method]
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    needs_teacher = not isinstance(spec, TokenMethod) or spec.needs_teacher
    if needs_teacher and teacher_logits is None:
        raise ValueError(f"teacher_logits: method {method!r} needs the teacher's logits, got None")
    if not needs_teacher:
        teacher_logits = None
    param = {"alpha": alpha, "beta": beta}.get(getattr(spec, "param", None) or "", 0.0)
    if not 0.0 <= param <= 1.0:
        raise ValueError(f"{spec.param} must be in [0, 1], got {param}")

    plan = _plan(
        student_logits,
        teacher_logits,
        labels,
        spec,
        vocab_size,
        param,
        tp_group,
        sampled_tokens,
        generator,
        seed,
        sampler,
        chunk_size,
        uniforms,
    )
    record = ForwardRecord()
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    loss_sum = VocabParallelDistillation.apply(
        student_logits, teacher, labels, sampled_tokens, plan, record
    )
    count = int(record.rows.numel())
    loss = loss_sum if reduction == "sum" else loss_sum / max(count, 1)

    diagnostics = {
        "loss": _mean(record.values, count),
        "loss_sum": loss_sum.detach().float(),
        "num_tokens": torch.tensor(count, device=loss_sum.device),
        "cross_entropy": _mean(record.cross_entropy, count),
    }
    if method in FULL_VOCAB_METHODS:
        diagnostics["divergence"] = diagnostics["loss"]
    for name, per_token in record.stats.items():
        diagnostics[name] = _mean(per_token, count)
    return loss, diagnostics


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
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sampler: str = "inverse_cdf",
    chunk_size: int | None = None,
) -> Tensor:
    """One token per supervised position from the student's fp32 softmax (real vocab only).

    Exactly the sampler ``distillation_loss(method="hpd")`` uses: with the same seed (and
    chunk size) it returns the tokens HPD draws. Returns a tensor shaped like ``labels``
    with -100 at unsupervised positions; identical on all TP ranks.
    """
    plan = _plan(
        student_logits,
        None,
        labels,
        _SAMPLE_ONLY,
        vocab_size,
        0.0,
        tp_group,
        None,
        generator,
        seed,
        sampler,
        chunk_size,
    )
    _, _, record = forward_pass(student_logits, None, labels, None, plan)
    out = torch.full(labels.shape, IGNORE_INDEX, dtype=torch.long, device=labels.device)
    out.view(-1)[record.rows] = record.sampled
    return out
