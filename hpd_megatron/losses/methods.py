"""Every distillation method as a weight on the student's log-likelihood.

The unified view (docs: hpd_method.md, section 1): for a frozen teacher p and student q,
``grad D = - sum_v w(v) grad log q(v)`` with w held constant, so a method is fixed by its
weight w and the token set it lives on. The kernel (``kernel.py``) only ever needs

* the gradient with respect to student logit j: ``sum_w * q_j - w_j`` (per token), and
* a reported value per token,

so adding a divergence means writing one of the two kinds of function below:

``FullVocabMethod.terms(logq, logp, param, with_value)``
    Elementwise over a chunk of the vocabulary: returns the weight w(v) and, when asked,
    the per-entry terms whose vocabulary sum is the divergence D reported as the loss
    value. logq/logp are log-softmaxes (fp32 or fp64), computed in log space so that
    probabilities that underflow to 0 give 0 (never 0 * log 0 = NaN). They must not be
    modified.

``TokenMethod.weights(point)``
    Per token, from the log-probabilities of a few token ids (the data token y and, for
    HPD, the student's sample yh): returns those ids' weights and the reported value.
    (On rollouts the data token is itself a student sample: on-policy distillation, ``opd``,
    weights it alone.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

import torch
from torch import Tensor

TermsFn = Callable[[Tensor, Tensor, float, bool], "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class FullVocabMethod:
    """A divergence whose weight lives on the whole vocabulary."""

    name: str
    terms: TermsFn
    param: str | None
    """Name of the method's coefficient argument (``alpha``/``beta``), or None."""
    value: str
    """What the reported loss value is (documentation)."""
    needs_teacher: ClassVar[bool] = True
    needs_sample: ClassVar[bool] = False


@dataclass(frozen=True)
class PointLogProbs:
    """Per-token log-probabilities at the data token y and the sample yh (yh may be absent)."""

    logq_y: Tensor
    logp_y: Tensor | None
    logq_s: Tensor | None = None
    logp_s: Tensor | None = None
    same: Tensor | None = None
    """[yh == y]."""


@dataclass(frozen=True)
class TokenWeights:
    """Weights on (y, yh) and the value reported for each token."""

    coef_y: Tensor
    coef_s: Tensor | None
    value: Tensor
    stats: dict[str, Tensor]
    """Per-token diagnostics (0/1 floats or values) the API averages over tokens."""


@dataclass(frozen=True)
class TokenMethod:
    """A method whose weight lives on the data token and, optionally, one student sample."""

    name: str
    weights: Callable[[PointLogProbs], TokenWeights]
    needs_teacher: bool
    needs_sample: bool
    value: str


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _log_mixture(log_a: Tensor, log_b: Tensor, a: float) -> Tensor:
    """log(a * exp(log_a) + (1 - a) * exp(log_b)), exact at a = 0 and a = 1."""
    if a <= 0.0:
        return log_b.clone()
    if a >= 1.0:
        return log_a.clone()
    return torch.logaddexp(log_a + _log(a), log_b + _log(1.0 - a))


# ---------------------------------------------------------------- full vocabulary


def _fkl(logq: Tensor, logp: Tensor, _: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # D = KL(p || q) = sum p (log p - log q);  w = p.
    p = logp.exp()
    value = torch.sub(logp, logq).mul_(p) if with_value else None
    return p, value


def _rkl(logq: Tensor, logp: Tensor, _: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # D = KL(q || p) = sum q (log q - log p);  w = q (log p - log q) = -(value terms).
    w = torch.sub(logp, logq).mul_(logq.exp())
    return w, (w.neg() if with_value else None)


def _skl(logq: Tensor, logp: Tensor, a: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # D = KL(p || m), m = a p + (1 - a) q;  w = (1 - a) p q / m.
    log_m = _log_mixture(logp, logq, a)
    value = torch.sub(logp, log_m).mul_(logp.exp()) if with_value else None
    w = log_m.neg_().add_(logp).add_(logq).exp_().mul_(1.0 - a)
    return w, value


def _srkl(logq: Tensor, logp: Tensor, a: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # D = KL(q || m'), m' = a q + (1 - a) p;  w = q [log(m'/q) + a q / m'].
    log_m = _log_mixture(logq, logp, a)
    q = logq.exp()
    log_ratio = torch.sub(log_m, logq)  # log(m'/q)
    value = (log_ratio * q).neg_() if with_value else None
    w = log_ratio.add_(log_ratio.neg().exp_().mul_(a)).mul_(q)  # q/m' = exp(-log(m'/q))
    return w, value


def _tvd(logq: Tensor, logp: Tensor, _: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # D = 1/2 sum |p - q|;  w = 1/2 q sign(p - q).
    q = logq.exp()
    diff = logp.exp().sub_(q)
    value = diff.abs().mul_(0.5) if with_value else None
    w = diff.sign_().mul_(q).mul_(0.5)
    return w, value


def _jsd(logq: Tensor, logp: Tensor, b: float, with_value: bool) -> tuple[Tensor, Tensor | None]:
    # Generalised JSD (GKD): D = b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q;
    # w = (1 - b) q log(m / q).
    log_m = _log_mixture(logp, logq, b)
    q = logq.exp()
    value = None
    if with_value:
        value = torch.sub(logp, log_m).mul_(logp.exp()).mul_(b)
        value.add_(torch.sub(logq, log_m).mul_(q), alpha=1.0 - b)
    w = log_m.sub_(logq).mul_(q).mul_(1.0 - b)
    return w, value


FULL_VOCAB_METHODS: dict[str, FullVocabMethod] = {
    "fkl": FullVocabMethod("fkl", _fkl, None, "KL(p || q), summed over the vocabulary"),
    "rkl": FullVocabMethod("rkl", _rkl, None, "KL(q || p)"),
    "skl": FullVocabMethod("skl", _skl, "alpha", "KL(p || alpha p + (1 - alpha) q)"),
    "srkl": FullVocabMethod("srkl", _srkl, "alpha", "KL(q || alpha q + (1 - alpha) p)"),
    "tvd": FullVocabMethod("tvd", _tvd, None, "1/2 sum_v |p - q|"),
    "jsd": FullVocabMethod(
        "jsd", _jsd, "beta", "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q"
    ),
}


# ---------------------------------------------------------------- data token / sample


def _sft(point: PointLogProbs) -> TokenWeights:
    ones = torch.ones_like(point.logq_y)
    return TokenWeights(ones, None, -point.logq_y, {})


HpdB = Literal["reference", "drop", "bound"]
"""``loss.hpd_b``: HPD's sample term B as the paper defines it (``reference``), set to 0
(``drop``: A alone) or bounded below by ``loss.hpd_b_floor`` (``bound``)."""


def hpd_token_weights(
    point: PointLogProbs, b_mode: HpdB = "reference", b_floor: float = -1.0
) -> TokenWeights:
    """HPD's A and B (hpd_method.md, section 2), with [yh != y] folded into B's coefficient.

    A = k + p(y) m1 + p(y) (m1 and m2),  B = kh m2,
    k = q(y) (log p(y) - log q(y)),  kh = q(yh) (log p(yh) - log q(yh)),
    m1 = [p(y) > q(y)],  m2 = [q(yh) > p(yh)];
    per-token value -(A log q(y) + B [yh != y] log q(yh)).

    ``b_mode`` (off by default): ``drop`` sets B to 0; ``bound`` uses max(B, b_floor). B is
    never positive (m2 means log p(yh) < log q(yh)), and with a confident teacher log p(yh)
    of a wrong sample is very negative, so B can outweigh A (docs/study.md).
    """
    q_y, p_y = point.logq_y.exp(), point.logp_y.exp()
    q_s, p_s = point.logq_s.exp(), point.logp_s.exp()
    k = q_y * (point.logp_y - point.logq_y)
    kh = q_s * (point.logp_s - point.logq_s)
    m1 = p_y > q_y
    m2 = q_s > p_s
    a = k + p_y * m1 + p_y * (m1 & m2)
    b = kh * m2
    if b_mode == "drop":
        b = torch.zeros_like(b)
    elif b_mode == "bound":
        b = b.clamp(min=b_floor)
    differs = ~point.same
    b_coef = b * differs
    value = -(a * point.logq_y + b_coef * point.logq_s)
    stats = {
        "hpd/sample_differs": differs,
        "hpd/a_negative": a < 0,
        "hpd/b_active": m2 & differs,
        "hpd/m1_and_m2": m1 & m2,
        "hpd/a_mean": a,
        "hpd/b_mean": b_coef,
    }
    return TokenWeights(a, b_coef, value, stats)


def hpd_variant(b_mode: HpdB, b_floor: float) -> TokenMethod:
    """The ``hpd`` method with its B term as ``b_mode`` says (``hpd_token_weights``)."""
    if b_mode not in ("reference", "drop", "bound"):
        raise ValueError(f"hpd_b must be reference, drop or bound, got {b_mode!r}")
    if b_mode == "reference":
        return TOKEN_METHODS["hpd"]
    weights = partial(hpd_token_weights, b_mode=b_mode, b_floor=b_floor)
    return dataclasses.replace(TOKEN_METHODS["hpd"], weights=weights)


def opd_token_weights(point: PointLogProbs) -> TokenWeights:
    """On-policy distillation: reverse KL through one student sample (hpd_method.md, section 1).

    On rollouts the data token y IS the student's sample, so the "one student sample v~q"
    column of reverse KL applies to it: the reward w = log p(y) - log q(y), per token,
    with no sum over later tokens; surrogate -w log q(y). The reported value is not the
    surrogate but -w = log q(y) - log p(y), the one-sample estimate of KL(q || p): over
    y ~ q the surrogate's gradient averages to that divergence's gradient, so, as for the
    full-vocabulary methods, the value is the divergence the gradient descends.
    """
    reward = point.logp_y - point.logq_y
    stats = {"opd/reward_mean": reward, "opd/reward_positive": reward > 0}
    return TokenWeights(reward, None, -reward, stats)


TOKEN_METHODS: dict[str, TokenMethod] = {
    "sft": TokenMethod(
        "sft",
        _sft,
        needs_teacher=False,
        needs_sample=False,
        value="cross-entropy -log q(y) of the data token",
    ),
    "hpd": TokenMethod(
        "hpd",
        hpd_token_weights,
        needs_teacher=True,
        needs_sample=True,
        value="the surrogate -(A log q(y) + B [yh != y] log q(yh))",
    ),
    "opd": TokenMethod(
        "opd",
        opd_token_weights,
        needs_teacher=True,
        needs_sample=False,
        value="the sampled reverse-KL estimate log q(y) - log p(y) (y: the student's token)",
    ),
}

METHODS = tuple(TOKEN_METHODS) + tuple(FULL_VOCAB_METHODS)

MethodName = Literal["hpd", "fkl", "rkl", "skl", "srkl", "tvd", "jsd", "sft", "opd"]
"""The recipes' ``loss.method``: every entry of the two tables above."""


def needs_teacher(method: str) -> bool:
    """Whether ``method`` compares with a teacher (every method but ``sft``)."""
    spec = TOKEN_METHODS.get(method)
    return spec.needs_teacher if spec is not None else method in FULL_VOCAB_METHODS
