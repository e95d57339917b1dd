"""Single-process tests of hpd_megatron.losses (no torch.distributed: ``tp_group=None``).

Every loss is compared with ``dense_loss``, an independent full-vocabulary
implementation written from the method page (fp64 log-softmax of both models, the
divergences in probability space with xlogy, HPD's A and B and on-policy distillation's
reward with explicit detach); the
full-vocabulary methods' gradients are also checked with torch.autograd.gradcheck.
The tensor-parallel tests are in test_losses_tp.py.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from hpd_megatron.losses import (
    FULL_VOCAB_METHODS,
    METHODS,
    SAMPLERS,
    TOKEN_METHODS,
    MethodName,
    Sampler,
    SamplingOptions,
    distillation_loss,
    sample_student_tokens,
)
from hpd_megatron.losses.methods import (
    PointLogProbs,
    TokenMethod,
    TokenWeights,
    hpd_token_weights,
    opd_token_weights,
)

# ---------------------------------------------------------------- dense reference


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, in probability space (0 log 0 = 0)."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def dense_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    method: str,
    vocab_size: int,
    alpha: float = 0.1,
    beta: float = 0.5,
    sampled: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The reference: token mean (or sum) of the method's per-token value."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    logq = torch.log_softmax(student[..., :vocab_size].to(dtype), dim=-1)
    q = logq.exp()
    mask = labels != -100
    y = torch.where(mask, labels, 0)
    if teacher is not None:
        logp = torch.log_softmax(teacher[..., :vocab_size].to(dtype), dim=-1)
        p = logp.exp()
    if method == "sft":
        per_token = F.nll_loss(logq.reshape(-1, vocab_size), y.reshape(-1), reduction="none").view(
            y.shape
        )
    elif method == "fkl":
        per_token = _kl(p, q)
    elif method == "rkl":
        per_token = _kl(q, p)
    elif method == "skl":
        per_token = _kl(p, alpha * p + (1 - alpha) * q)
    elif method == "srkl":
        per_token = _kl(q, alpha * q + (1 - alpha) * p)
    elif method == "tvd":
        per_token = 0.5 * (p - q).abs().sum(-1)
    elif method == "jsd":
        m = beta * p + (1 - beta) * q
        per_token = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    elif method == "hpd":
        ys = torch.where(mask, sampled, 0)
        lq_y, lp_y = logq.gather(-1, y[..., None])[..., 0], logp.gather(-1, y[..., None])[..., 0]
        lq_s, lp_s = logq.gather(-1, ys[..., None])[..., 0], logp.gather(-1, ys[..., None])[..., 0]
        qy, py, qs, ps = lq_y.exp(), lp_y.exp(), lq_s.exp(), lp_s.exp()
        m1 = (py > qy).to(dtype)
        m2 = (qs > ps).to(dtype)
        a = (qy * (lp_y - lq_y) + py * m1 + py * m1 * m2).detach()
        b = (qs * (lp_s - lq_s) * m2).detach()
        per_token = -a * lq_y - b * (ys != y).to(dtype) * lq_s
    elif method == "opd":
        lq_y, lp_y = logq.gather(-1, y[..., None])[..., 0], logp.gather(-1, y[..., None])[..., 0]
        reward = (lp_y - lq_y).detach()
        surrogate = -reward * lq_y
        # Value: the estimate log q(y) - log p(y); gradient: the surrogate's.
        per_token = -reward + (surrogate - surrogate.detach())
    else:
        raise AssertionError(method)
    total = torch.where(mask, per_token, 0.0).sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1)


# ---------------------------------------------------------------- inputs

VOCAB = 37  # real vocabulary
STUDENT_WIDTH = 40  # padded widths differ between the models
TEACHER_WIDTH = 45


def make_inputs(shape=(5, 3), dtype=torch.float64, seed=0, scale=2.0):
    """Random logits whose padding columns are huge, so any leak into a softmax shows."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, STUDENT_WIDTH, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(*shape, TEACHER_WIDTH, generator=g, dtype=torch.float64) * scale
    student[..., VOCAB:] = 30.0
    teacher[..., VOCAB:] = 30.0
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels.view(-1)[::4] = -100  # prompt / padding positions
    sampled = torch.randint(0, VOCAB, shape, generator=g)
    sampled.view(-1)[1::3] = labels.view(-1)[1::3].clamp_min(0)  # some yh == y
    return student.to(dtype).requires_grad_(), teacher.to(dtype), labels, sampled


def run(method, student, teacher, labels, sampled=None, *, sampling=None, **kw):
    """distillation_loss at TP = 1; ``sampled`` stands for SamplingOptions(sampled_tokens=...)."""
    kw.setdefault("tp_group", None)
    sampling = sampling or SamplingOptions(sampled_tokens=sampled)
    return distillation_loss(
        student, teacher, labels, method, vocab_size=VOCAB, sampling=sampling, **kw
    )


def grads(loss, student):
    (grad,) = torch.autograd.grad(loss, student)
    return grad


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_reference_fp64(method):
    student, teacher, labels, sampled = make_inputs()
    kw = dict(alpha=0.3, beta=0.4)
    loss, diag = run(method, student, teacher, labels, sampled, chunk_size=4, **kw)
    ref = dense_loss(student, teacher, labels, method, VOCAB, sampled=sampled, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    grad, ref_grad = grads(loss, student), grads(ref, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.dtype == torch.float64
    assert torch.all(grad[..., VOCAB:] == 0), "padding columns must get no gradient"
    assert torch.all(grad[labels == -100] == 0), "masked positions must get no gradient"
    assert grad.abs().sum() > 0
    assert int(diag["num_tokens"]) == int((labels != -100).sum())
    ce = dense_loss(student, None, labels, "sft", VOCAB)
    assert float(diag["cross_entropy"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(diag["loss"]) == pytest.approx(float(ref), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["hpd", "fkl", "jsd"])
def test_sum_reduction_and_layouts(method):
    """reduction='sum' is the mean times num_tokens; [seq, batch] and [batch, seq] agree."""
    student, teacher, labels, sampled = make_inputs(shape=(6, 2))
    mean, diag = run(method, student, teacher, labels, sampled, chunk_size=5)
    total, _ = run(method, student, teacher, labels, sampled, reduction="sum")
    torch.testing.assert_close(total, mean * diag["num_tokens"].double(), rtol=1e-12, atol=1e-12)
    ref = dense_loss(student, teacher, labels, method, VOCAB, sampled=sampled, reduction="sum")
    torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-12)

    s_t = student.detach().transpose(0, 1).contiguous().requires_grad_()
    mean_t, _ = run(method, s_t, teacher.transpose(0, 1), labels.t(), sampled.t(), chunk_size=3)
    torch.testing.assert_close(mean_t, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grads(mean_t, s_t).transpose(0, 1), grads(mean, student), rtol=1e-10, atol=1e-13
    )


def test_chunk_size_does_not_change_results():
    student, teacher, labels, sampled = make_inputs(shape=(7, 3))
    results = []
    for chunk in (1, 4, 1000):
        loss, _ = run("hpd", student, teacher, labels, sampled, chunk_size=chunk)
        results.append((loss, grads(loss, student)))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("method", ["sft"] + sorted(FULL_VOCAB_METHODS))
def test_gradcheck(method):
    """For sft and the full-vocabulary methods the gradient is the value's exact gradient."""
    student, teacher, labels, _ = make_inputs(shape=(3, 2), scale=1.0)
    torch.autograd.gradcheck(
        lambda s: run(method, s, teacher, labels, chunk_size=2, alpha=0.25, beta=0.7)[0],
        (student,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


def test_gradcheck_token_path_with_new_method():
    """HPD's backward path (weights on y and on a sample), gradchecked through a method
    whose weights depend on the teacher only (HPD's A, B depend on the student, so its
    value's numerical derivative is not the stop-gradient one). Registering it is all
    a new one-sample method needs."""

    def teacher_weighted(point: PointLogProbs) -> TokenWeights:
        coef_y, coef_s = point.logp_y.exp() + 0.5, -point.logp_s
        value = -(coef_y * point.logq_y + coef_s * point.logq_s)
        return TokenWeights(coef_y, coef_s, value, {})

    TOKEN_METHODS["_teacher_weighted"] = TokenMethod(
        "_teacher_weighted", teacher_weighted, True, True, ""
    )
    try:
        student, teacher, labels, sampled = make_inputs(shape=(3, 2), scale=1.0)
        torch.autograd.gradcheck(
            lambda s: run("_teacher_weighted", s, teacher, labels, sampled, chunk_size=2)[0],
            (student,),
            eps=1e-6,
            atol=1e-7,
            rtol=1e-5,
        )
    finally:
        del TOKEN_METHODS["_teacher_weighted"]


def test_hpd_gradient_is_the_stop_gradient_formula():
    """d/dz_j of -(A log q(y) + B' log q(yh)) = (A + B') q_j - A [j=y] - B' [j=yh], /count."""
    student, teacher, labels, sampled = make_inputs(shape=(4, 2))
    loss, diag = run("hpd", student, teacher, labels, sampled)
    grad = grads(loss, student)
    z = student.detach()[..., :VOCAB]
    q = torch.softmax(z, -1)
    p = torch.softmax(teacher[..., :VOCAB], -1)
    mask = labels != -100
    y, ys = labels.clamp_min(0), sampled
    qy, py = q.gather(-1, y[..., None])[..., 0], p.gather(-1, y[..., None])[..., 0]
    qs, ps = q.gather(-1, ys[..., None])[..., 0], p.gather(-1, ys[..., None])[..., 0]
    m1, m2 = py > qy, qs > ps
    a = qy * torch.log(py / qy) + py * m1 + py * (m1 & m2)
    b = qs * torch.log(ps / qs) * m2 * (ys != y)
    expected = (a + b)[..., None] * q
    expected -= a[..., None] * F.one_hot(y, VOCAB) + b[..., None] * F.one_hot(ys, VOCAB)
    expected = torch.where(mask[..., None], expected, 0.0) / mask.sum()
    torch.testing.assert_close(grad[..., :VOCAB], expected, rtol=1e-9, atol=1e-13)
    n = mask.sum()
    assert float(diag["hpd/a_negative"]) == pytest.approx(float(((a < 0) & mask).sum() / n))
    assert float(diag["hpd/b_active"]) == pytest.approx(float(((m2 & (ys != y)) & mask).sum() / n))
    assert float(diag["hpd/m1_and_m2"]) == pytest.approx(float(((m1 & m2) & mask).sum() / n))
    assert float(diag["hpd/sample_differs"]) == pytest.approx(float(((ys != y) & mask).sum() / n))


# ---------------------------------------------------------------- HPD worked values


def _point(p_y, q_y, p_s=0.5, q_s=0.5, same=False):
    t = lambda x: torch.tensor([math.log(x)], dtype=torch.float64)  # noqa: E731
    return PointLogProbs(t(q_y), t(p_y), t(q_s), t(p_s), torch.tensor([same]))


@pytest.mark.parametrize(
    "p_y, q_y, m2, expected",
    [
        (0.6, 0.3, False, 0.808),
        (0.6, 0.3, True, 1.408),
        (0.3, 0.6, False, -0.416),
        (0.3, 0.6, True, -0.416),
        (0.9, 0.1, False, 1.12),
        (0.9, 0.1, True, 2.02),
        (0.01, 0.9, False, -4.05),
    ],
)
def test_hpd_worked_values_of_a(p_y, q_y, m2, expected):
    # m2 = [q(yh) > p(yh)]: a sample with q 0.5 against p 0.05 (on) or 0.9 (off).
    weights = hpd_token_weights(_point(p_y, q_y, p_s=0.05 if m2 else 0.9, q_s=0.5))
    assert float(weights.coef_y) == pytest.approx(expected, abs=6e-4)


def test_hpd_worked_value_of_b():
    weights = hpd_token_weights(_point(0.6, 0.3, p_s=0.05, q_s=0.5))
    assert float(weights.coef_s) == pytest.approx(-1.15, abs=2e-3)
    assert float(weights.coef_s) == pytest.approx(0.5 * math.log(0.1), rel=1e-12)
    # m2 off (q(yh) < p(yh)) or yh == y: no sample term.
    assert float(hpd_token_weights(_point(0.6, 0.3, p_s=0.9, q_s=0.5)).coef_s) == 0.0
    assert float(hpd_token_weights(_point(0.6, 0.3, p_s=0.05, q_s=0.5, same=True)).coef_s) == 0.0


def _hpd_worked_example(**options) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Two-token vocabulary (and a padding column): q = (0.3, 0.7), p = (0.6, 0.4), y = 0,
    yh = 1 (m1 and m2 on); (student logits, loss, diagnostics) with ``options``."""
    student = torch.log(torch.tensor([[0.3, 0.7, 0.0]], dtype=torch.float64)).requires_grad_()
    teacher = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    loss, diag = distillation_loss(
        student,
        teacher,
        torch.tensor([0]),
        "hpd",
        vocab_size=2,
        sampling=SamplingOptions(sampled_tokens=torch.tensor([1])),
        tp_group=None,
        **options,
    )
    return student, loss, diag


def test_hpd_worked_example_end_to_end():
    """Two-token vocabulary: q = (0.3, 0.7), p = (0.6, 0.4), y = 0, yh = 1 (m1 and m2 on)."""
    student, loss, diag = _hpd_worked_example()
    a = 0.3 * math.log(2) + 0.6 + 0.6  # 1.408
    b = 0.7 * math.log(0.4 / 0.7)
    assert a == pytest.approx(1.408, abs=5e-4)
    assert float(loss) == pytest.approx(-(a * math.log(0.3) + b * math.log(0.7)), rel=1e-12)
    assert float(diag["hpd/a_mean"]) == pytest.approx(a, rel=1e-6)
    assert float(diag["hpd/m1_and_m2"]) == 1.0 and float(diag["hpd/b_active"]) == 1.0
    grad = grads(loss, student)[0]
    # d/dz_0 = (A + B) q_0 - A;  d/dz_1 = (A + B) q_1 - B;  the padding column: 0.
    assert grad.tolist() == pytest.approx([(a + b) * 0.3 - a, (a + b) * 0.7 - b, 0.0], rel=1e-10)


# ---------------------------------------------------------------- on-policy distillation


@pytest.mark.parametrize(
    "p_y, q_y, reward",
    [
        (0.6, 0.3, 0.6931471805599453),  # log 2
        (0.3, 0.6, -0.6931471805599453),
        (0.9, 0.1, 2.197224577336219),  # log 9
        (0.01, 0.9, -4.499809670330265),  # log(1/90)
        (0.5, 0.5, 0.0),
    ],
)
def test_opd_worked_weights(p_y, q_y, reward):
    """w = log p(y) - log q(y) on y alone; the value is the estimate log q(y) - log p(y)."""
    weights = opd_token_weights(_point(p_y, q_y))
    assert float(weights.coef_y) == pytest.approx(reward, rel=1e-12, abs=1e-15)
    assert weights.coef_s is None
    assert float(weights.value) == pytest.approx(-reward, rel=1e-12, abs=1e-15)
    assert float(weights.stats["opd/reward_mean"]) == pytest.approx(reward, rel=1e-12, abs=1e-15)
    assert bool(weights.stats["opd/reward_positive"]) == (reward > 0)


def test_opd_worked_example_end_to_end():
    """Two-token vocabulary plus a padding column: q = (0.3, 0.7), p = (0.6, 0.4), y = 0."""
    student = torch.log(torch.tensor([[0.3, 0.7, 0.0]], dtype=torch.float64)).requires_grad_()
    teacher = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    loss, diag = distillation_loss(
        student, teacher, torch.tensor([0]), "opd", vocab_size=2, tp_group=None
    )
    assert float(loss) == pytest.approx(-0.6931471805599453, rel=1e-12)  # log 0.3 - log 0.6
    assert float(diag["opd/reward_mean"]) == pytest.approx(0.6931471805599453, rel=1e-6)
    assert float(diag["opd/reward_positive"]) == 1.0
    # d/dz of -w log q(0), w = log 2: w (q_0 - 1), w q_1, and nothing on the padding column.
    grad = grads(loss, student)[0]
    assert grad.tolist() == pytest.approx(
        [-0.48520302639196167, 0.48520302639196167, 0.0], rel=1e-10
    )


def test_opd_gradient_against_an_autograd_reference():
    """The gradient of -sum sg(log p(y) - log q(y)) log q(y) / N over supervised tokens,
    differentiated by autograd in fp64 on the real vocabulary only."""
    student, teacher, labels, _ = make_inputs(shape=(6, 3))
    loss, diag = run("opd", student, teacher, labels, chunk_size=4)

    z = student.detach()[..., :VOCAB].clone().requires_grad_()
    mask = labels != -100
    y = labels[mask]
    logq_y = torch.log_softmax(z[mask], -1).gather(-1, y[:, None])[:, 0]
    logp_y = torch.log_softmax(teacher[..., :VOCAB][mask], -1).gather(-1, y[:, None])[:, 0]
    reward = (logp_y - logq_y).detach()
    surrogate = -(reward * logq_y).sum() / mask.sum()
    (expected,) = torch.autograd.grad(surrogate, z)

    grad = grads(loss, student)
    torch.testing.assert_close(grad[..., :VOCAB], expected, rtol=1e-10, atol=1e-14)
    assert torch.all(grad[..., VOCAB:] == 0), "padding columns must get no gradient"
    assert torch.all(grad[~mask] == 0), "ignore-index positions must get no gradient"
    assert grad.abs().sum() > 0
    # The reported value is the reverse-KL estimate, not the surrogate.
    estimate = -reward.mean()
    assert float(loss) == pytest.approx(float(estimate), rel=1e-12)
    assert float(loss) != pytest.approx(float(surrogate), rel=1e-3)
    assert float(diag["opd/reward_mean"]) == pytest.approx(-float(estimate), rel=1e-6)
    assert float(diag["opd/reward_positive"]) == pytest.approx(float((reward > 0).double().mean()))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", METHODS)
def test_all_masked_batch(method):
    student, teacher, labels, sampled = make_inputs(shape=(3, 2), dtype=torch.float32)
    labels = torch.full_like(labels, -100)
    loss, diag = run(method, student, teacher, labels, sampling=SamplingOptions(seed=0))
    assert float(loss) == 0.0
    assert all(math.isfinite(float(v)) for v in diag.values())
    assert int(diag["num_tokens"]) == 0
    grad = grads(loss, student)
    assert torch.all(grad == 0) and grad.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs(method):
    student, teacher, labels, sampled = make_inputs(shape=(6, 4), dtype=torch.bfloat16)
    loss, _ = run(method, student, teacher, labels, sampled, chunk_size=7)
    grad = grads(loss, student)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    s32 = student.detach().float().requires_grad_()
    loss32, _ = run(method, s32, teacher.float(), labels, sampled)
    torch.testing.assert_close(loss, loss32, rtol=1e-5, atol=1e-6)
    grad32 = grads(loss32, s32)
    torch.testing.assert_close(grad.float(), grad32, rtol=0, atol=float(grad32.abs().max()) * 1e-2)


@pytest.mark.parametrize("method", sorted(FULL_VOCAB_METHODS) + ["hpd", "opd"])
def test_underflowing_probabilities_stay_finite(method):
    """fp32 logits spread over ~200 nats: many p and q are exactly 0 in fp32 (not in the
    fp64 reference, whose probability-space KL would be inf where q underflows)."""
    student, teacher, labels, sampled = make_inputs(shape=(4, 3), dtype=torch.float32, scale=50.0)
    with torch.no_grad():
        student[..., VOCAB:] = 30.0
        teacher[..., VOCAB:] = 30.0
    assert (torch.softmax(teacher[..., :VOCAB], -1) == 0).float().mean() > 0.2
    loss, diag = run(method, student, teacher, labels, sampled, alpha=0.3, beta=0.4)
    grad = grads(loss, student)
    assert math.isfinite(float(loss)) and torch.isfinite(grad).all()
    s64 = student.detach().double().requires_grad_()
    ref = dense_loss(
        s64, teacher.double(), labels, method, VOCAB, alpha=0.3, beta=0.4, sampled=sampled
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
    ref_grad = grads(ref, s64)
    # Log-ratios of hundreds of nats in fp32 carry ~1e-5 absolute error.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4)


def test_errors_name_the_tensor():
    student, teacher, labels, sampled = make_inputs(shape=(2, 2))
    with pytest.raises(ValueError, match="teacher_logits"):
        run("hpd", student, None, labels, sampled)
    with pytest.raises(ValueError, match="labels.*outside the real vocabulary"):
        run("fkl", student, teacher, labels.masked_fill(labels == labels.max(), VOCAB))
    with pytest.raises(ValueError, match="labels"):
        run("fkl", student, teacher, labels.masked_fill(labels == labels.max(), -5))
    with pytest.raises(ValueError, match="sampled_tokens"):
        run("hpd", student, teacher, labels, torch.full_like(sampled, VOCAB + 3))
    with pytest.raises(ValueError, match="student_logits.*cover only"):
        distillation_loss(
            student, teacher, labels, "fkl", vocab_size=STUDENT_WIDTH + 1, tp_group=None
        )
    with pytest.raises(ValueError, match="teacher_logits: shape"):
        run("fkl", student, teacher[:1], labels)
    with pytest.raises(ValueError, match="method"):
        run("kl", student, teacher, labels)
    with pytest.raises(ValueError, match="alpha"):
        run("skl", student, teacher, labels, alpha=1.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplingOptions(sampler="multinomial")
    with pytest.raises(ValueError, match="sampled_tokens"):
        sample_student_tokens(
            student, labels, vocab_size=VOCAB, sampling=SamplingOptions(sampled_tokens=sampled)
        )


@pytest.mark.parametrize("method", ["hpd", "fkl", "jsd"])
def test_fused_head_backward_by_vocabulary_blocks(method):
    """fp64, several token chunks forward and several vocabulary blocks backward (1,024
    padded rows for 1,000 real ones, 3 tokens per chunk: blocks of 128 columns): the fused
    head's loss and gradients equal the materialised path's."""
    from hpd_megatron.losses.distillation import fused_distillation_loss
    from hpd_megatron.losses.fused_head import OutputHead

    g = torch.Generator().manual_seed(11)
    vocab, rows, seq, batch, width = 1000, 1024, 9, 2, 16
    hidden = torch.randn(seq, batch, width, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(seq, batch, width + 8, generator=g, dtype=torch.float64)
    weight = torch.randn(rows, width, generator=g, dtype=torch.float64)
    t_weight = torch.randn(rows, width + 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    options = dict(vocab_size=vocab, tp_group=None, chunk_size=3, sampling=SamplingOptions(seed=4))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h1 @ w1.t()).transpose(0, 1)
    reference, _ = distillation_loss(
        logits, (t_hidden @ t_weight.t()).transpose(0, 1), labels, method, **options
    )
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused, _ = fused_distillation_loss(
        OutputHead(h2, w2), OutputHead(t_hidden, t_weight), labels, method, **options
    )
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, [h2, w2]), torch.autograd.grad(reference, [h1, w1])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_head_errors_name_the_tensor():
    from hpd_megatron.losses.distillation import fused_distillation_loss
    from hpd_megatron.losses.fused_head import OutputHead

    hidden, weight = torch.randn(5, 2, 8), torch.randn(STUDENT_WIDTH, 8)
    labels = torch.randint(0, VOCAB, (2, 5))

    def run_heads(student, teacher, labels, method="hpd"):
        return fused_distillation_loss(
            student, teacher, labels, method, vocab_size=VOCAB, tp_group=None
        )

    student, teacher = OutputHead(hidden, weight), OutputHead(hidden, weight)
    with pytest.raises(ValueError, match=r"student.hidden: shape \(5, 2, 8\) is not \[s, b, h\]"):
        run_heads(student, teacher, labels.t())
    with pytest.raises(
        ValueError, match=r"teacher.weight: shape \(\d+, 4\) is not \[vocab/TP, 8\]"
    ):
        run_heads(student, OutputHead(hidden, weight[:, :4]), labels)
    with pytest.raises(ValueError, match="teacher: method 'fkl' needs the teacher"):
        run_heads(student, None, labels, "fkl")


def test_literal_types_name_every_choice():
    assert sorted(get_args(MethodName)) == sorted(METHODS)
    assert get_args(Sampler) == SAMPLERS


def test_sft_needs_no_teacher():
    student, _, labels, _ = make_inputs(shape=(4, 3))
    loss, _ = run("sft", student, None, labels)
    ref = F.cross_entropy(
        student[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads(loss, student), grads(ref, student), rtol=1e-10, atol=1e-14)


def test_teacher_gets_no_gradient():
    student, teacher, labels, sampled = make_inputs(shape=(2, 2))
    teacher.requires_grad_()
    loss, _ = run("jsd", student, teacher, labels)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- sampling (TP = 1)


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("sampler", ["inverse_cdf", "gumbel"])
def test_sampler_matches_softmax_single_rank(sampler):
    """20,000 draws from one row: chi-square (9 dof) below 27.9 (p = 0.001)."""
    row = torch.tensor(
        [1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 0.7, 1.5, -0.3, 0.4, 9.0, 9.0]
    )  # 2 padding columns
    logits = row.expand(20000, -1).contiguous()
    labels = torch.zeros(20000, dtype=torch.long)

    def draw(seed):
        sampling = SamplingOptions(sampler=sampler, seed=seed)
        return sample_student_tokens(
            logits, labels, vocab_size=10, tp_group=None, chunk_size=3000, sampling=sampling
        )

    samples = draw(3)
    assert samples.max() < 10
    assert _chi_square(samples, torch.softmax(row[:10], -1)) < 27.9
    again, other = draw(3), draw(4)
    assert torch.equal(samples, again) and not torch.equal(samples, other)


@pytest.mark.parametrize("source", ["inverse_cdf", "gumbel", "uniforms"])
def test_hpd_draws_the_sampler_tokens(source):
    """HPD with a seed (or given uniforms) equals HPD given sample_student_tokens' draw."""
    student, teacher, labels, _ = make_inputs(shape=(6, 3), dtype=torch.float32)
    if source == "uniforms":
        u = torch.rand(
            labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        sampling = SamplingOptions(uniforms=u)
    else:
        sampling = SamplingOptions(sampler=source, seed=11)
    drawn = sample_student_tokens(
        student, labels, vocab_size=VOCAB, tp_group=None, chunk_size=5, sampling=sampling
    )
    assert torch.equal(drawn == -100, labels == -100)
    loss, diag = run("hpd", student, teacher, labels, sampling=sampling, chunk_size=5)
    explicit, _ = run("hpd", student, teacher, labels, drawn, chunk_size=5)
    # Not bit-identical: the inverse-CDF pass sums exponentials as a running sum.
    torch.testing.assert_close(loss, explicit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads(loss, student), grads(explicit, student), rtol=1e-5, atol=1e-8)
    assert 0.0 < float(diag["hpd/sample_differs"]) <= 1.0


def test_given_uniforms_make_each_sequence_draw_on_its_own():
    """uniforms= replaces the seeded draw exactly, and rows sampled together or alone agree."""
    student, teacher, labels, _ = make_inputs(shape=(6, 3), dtype=torch.float64)
    seeded, _ = run("hpd", student, teacher, labels, sampling=SamplingOptions(seed=5), chunk_size=4)
    u = torch.rand(
        labels.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    ).view(labels.shape)
    given, _ = run(
        "hpd", student, teacher, labels, chunk_size=4, sampling=SamplingOptions(uniforms=u)
    )
    assert torch.equal(seeded, given)
    # Columns are sequences here ([seq, batch] layout): the sum over all of them equals the
    # sum of each sequence's loss computed alone with its own uniforms.
    alone = sum(
        distillation_loss(
            student[:, b],
            teacher[:, b],
            labels[:, b],
            "hpd",
            vocab_size=VOCAB,
            reduction="sum",
            tp_group=None,
            sampling=SamplingOptions(uniforms=u[:, b]),
        )[0]
        for b in range(labels.shape[1])
    )
    together = distillation_loss(
        student,
        teacher,
        labels,
        "hpd",
        vocab_size=VOCAB,
        reduction="sum",
        tp_group=None,
        sampling=SamplingOptions(uniforms=u),
    )[0]
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"uniforms: shape \(3,\) != labels \(6, 3\)"):
        run("hpd", student, teacher, labels, sampling=SamplingOptions(uniforms=u[0]))


# ---------------------------------------------------------------- HPD's B variants (loss.hpd_b)


@pytest.mark.parametrize(
    "b_mode, b_floor, expected_b",
    [
        ("reference", -1.0, 0.5 * math.log(0.1)),  # -1.1513: the worked value above
        ("drop", -1.0, 0.0),
        ("bound", -1.0, -1.0),  # max(-1.1513, -1)
        ("bound", -2.0, 0.5 * math.log(0.1)),  # above the floor: unchanged
    ],
)
def test_hpd_b_variants_worked_values(b_mode, b_floor, expected_b):
    # q(y) 0.3, p(y) 0.6, sample q 0.5 against p 0.05 (m2 on): A = 1.408 in every variant.
    weights = hpd_token_weights(_point(0.6, 0.3, p_s=0.05, q_s=0.5), b_mode, b_floor)
    assert float(weights.coef_s) == pytest.approx(expected_b, rel=1e-12, abs=1e-15)
    assert float(weights.coef_y) == pytest.approx(1.408, abs=6e-4)
    assert float(weights.stats["hpd/b_mean"]) == pytest.approx(expected_b, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("b_mode, b_floor", [("drop", -1.0), ("bound", -0.2)])
def test_hpd_b_variants_end_to_end(b_mode, b_floor):
    """The worked example above (A = 1.408, B = 0.7 log(0.4 / 0.7) = -0.392) with B dropped
    (0) or bounded at -0.2: loss and gradient with the changed B, A untouched."""
    student, loss, _ = _hpd_worked_example(hpd_b=b_mode, hpd_b_floor=b_floor)
    a = 0.3 * math.log(2) + 0.6 + 0.6
    b = {"drop": 0.0, "bound": -0.2}[b_mode]
    assert float(loss) == pytest.approx(-(a * math.log(0.3) + b * math.log(0.7)), rel=1e-12)
    grad = grads(loss, student)[0]
    assert grad.tolist() == pytest.approx([(a + b) * 0.3 - a, (a + b) * 0.7 - b, 0.0], rel=1e-10)


def test_hpd_b_reference_is_the_default_and_unknown_variants_are_refused():
    point = _point(0.6, 0.3, p_s=0.05, q_s=0.5)
    assert float(hpd_token_weights(point).coef_s) == float(
        hpd_token_weights(point, "reference", -1e-9).coef_s
    )
    with pytest.raises(ValueError, match="hpd_b must be reference, drop or bound"):
        distillation_loss(
            torch.zeros(1, 2, dtype=torch.float64, requires_grad=True),
            torch.zeros(1, 2, dtype=torch.float64),
            torch.tensor([0]),
            "hpd",
            vocab_size=2,
            hpd_b="clip",
            tp_group=None,
        )
