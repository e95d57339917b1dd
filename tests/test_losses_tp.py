"""hpd_megatron.losses under tensor parallelism: TP = 2 and 4 give TP = 1's results.

One spawn per TP size runs every check on gloo ranks (Megatron's parallel_state provides
the TP group); each rank slices its shard from the same full logits, and the parent
concatenates the gradient shards and compares layouts. Student and teacher are padded
to different widths (104 and 112 rows for a 97-token vocabulary), so the shards of the
two models are misaligned on every rank but the first and the last rank holds padding.
"""

from __future__ import annotations

import pytest
import torch

from hpd_megatron.losses import METHODS, SamplingOptions
from tests.multiprocess import run_on_ranks
from tests.test_losses import dense_loss

VOCAB, STUDENT_ROWS, TEACHER_ROWS = 97, 104, 112
SHAPE = (7, 3)  # [seq, batch]
TP_SIZES = (1, 2, 4)
# Sampler check: a 10-token vocabulary padded to 12 rows (TP=4: rank 3 holds 1 real row).
SAMPLER_ROW = [1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 0.7, 1.5, -0.3, 0.4]
SAMPLER_DRAWS = 20000


def _inputs():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(*SHAPE, STUDENT_ROWS, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(*SHAPE, TEACHER_ROWS, generator=g, dtype=torch.float64) * 2
    student[..., VOCAB:] = 25.0  # padding: would dominate any softmax it leaked into
    teacher[..., VOCAB:] = 25.0
    labels = torch.randint(0, VOCAB, SHAPE, generator=g)
    labels.view(-1)[::3] = -100
    sampled = torch.randint(0, VOCAB, SHAPE, generator=g)
    sampled.view(-1)[1::4] = labels.view(-1)[1::4].clamp_min(0)
    return student, teacher, labels, sampled


def _shard(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    width = full.shape[-1] // tp
    return full[..., rank * width : (rank + 1) * width].clone()


def _tp_body(tp: int) -> dict:
    from megatron.core import parallel_state

    from hpd_megatron.losses import distillation_loss, sample_student_tokens
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(tp, 1), seed=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    student_full, teacher_full, labels, sampled = _inputs()
    out: dict = {"methods": {}, "drawn": {}, "sampler": {}}

    def one(method, student_full, teacher_full, labels, **kw):
        student = _shard(student_full, rank, tp).requires_grad_()
        loss, diag = distillation_loss(
            student,
            _shard(teacher_full, rank, tp),
            labels,
            method,
            vocab_size=VOCAB,
            alpha=0.3,
            beta=0.4,
            chunk_size=5,
            **kw,
        )
        loss.backward()
        return loss.detach(), student.grad, {k: v.double() for k, v in diag.items()}

    for method in METHODS:
        out["methods"][method] = one(
            method,
            student_full,
            teacher_full,
            labels,
            sampling=SamplingOptions(sampled_tokens=sampled),
        )
    # HPD drawing its own samples (fp32), with an explicit group argument for once.
    for sampler in ("inverse_cdf", "gumbel"):
        out["drawn"][sampler] = one(
            "hpd",
            student_full.float(),
            teacher_full.float(),
            labels,
            sampling=SamplingOptions(sampler=sampler, seed=7),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
    masked = torch.full_like(labels, -100)
    out["masked"] = one("hpd", student_full, teacher_full, masked, sampling=SamplingOptions(seed=7))

    row = torch.tensor(SAMPLER_ROW + [30.0, 30.0])
    logits = _shard(row.expand(SAMPLER_DRAWS, -1), rank, tp)
    for sampler in ("inverse_cdf", "gumbel"):
        out["sampler"][sampler] = sample_student_tokens(
            logits,
            torch.zeros(SAMPLER_DRAWS, dtype=torch.long),
            vocab_size=len(SAMPLER_ROW),
            chunk_size=3000,
            sampling=SamplingOptions(sampler=sampler, seed=3),
        )
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def by_tp() -> dict[int, list[dict]]:
    return {tp: run_on_ranks(_tp_body, tp, tp, timeout=200) for tp in TP_SIZES}


def _full_grad(ranks: list[dict], key: str, method: str) -> torch.Tensor:
    return torch.cat([r[key][method][1] for r in ranks], dim=-1)


@pytest.mark.parametrize("method", METHODS)
def test_every_tp_size_matches_tp1_and_the_reference(by_tp, method):
    student, teacher, labels, sampled = _inputs()
    student.requires_grad_()
    ref = dense_loss(student, teacher, labels, method, VOCAB, alpha=0.3, beta=0.4, sampled=sampled)
    (ref_grad,) = torch.autograd.grad(ref, student)
    tp1_loss, tp1_grad, tp1_diag = by_tp[1][0]["methods"][method]
    torch.testing.assert_close(tp1_loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tp1_grad, ref_grad, rtol=1e-9, atol=1e-12)
    for tp in TP_SIZES[1:]:
        ranks = by_tp[tp]
        for r in ranks:
            loss, _, diag = r["methods"][method]
            torch.testing.assert_close(loss, tp1_loss, rtol=1e-10, atol=1e-12, msg=f"TP={tp} loss")
            for name, value in tp1_diag.items():
                torch.testing.assert_close(
                    diag[name], value, rtol=1e-6, atol=1e-7, msg=f"TP={tp} {name}"
                )
        grad = _full_grad(ranks, "methods", method)
        torch.testing.assert_close(grad, tp1_grad, rtol=1e-9, atol=1e-12, msg=f"TP={tp} gradient")


@pytest.mark.parametrize("sampler", ["inverse_cdf", "gumbel"])
def test_hpd_with_its_own_samples_is_consistent_across_ranks(by_tp, sampler):
    tp1_loss, tp1_grad, tp1_diag = by_tp[1][0]["drawn"][sampler]
    assert 0 < float(tp1_diag["hpd/sample_differs"]) <= 1
    for tp in TP_SIZES[1:]:
        ranks = by_tp[tp]
        for r in ranks[1:]:
            assert torch.equal(r["drawn"][sampler][0], ranks[0]["drawn"][sampler][0])
            assert r["drawn"][sampler][2] == ranks[0]["drawn"][sampler][2]
        if sampler == "inverse_cdf":
            # Vocabulary order is rank order: the same uniforms pick the same tokens at any TP.
            torch.testing.assert_close(
                ranks[0]["drawn"][sampler][0], tp1_loss, rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                _full_grad(ranks, "drawn", sampler), tp1_grad, rtol=1e-4, atol=1e-6
            )


def test_all_masked_batch_under_tp(by_tp):
    for tp in TP_SIZES:
        for r in by_tp[tp]:
            loss, grad, diag = r["masked"]
            assert float(loss) == 0.0 and torch.all(grad == 0) and int(diag["num_tokens"]) == 0


@pytest.mark.parametrize("sampler", ["inverse_cdf", "gumbel"])
def test_sampler_matches_the_softmax_under_tp(by_tp, sampler):
    """20,000 draws from one row split over 2 (and 4) ranks: chi-square with 9 dof below
    27.9 (p = 0.001), identical on every rank. A sampler that ignored a shard would put
    no mass on its 4-6 tokens (chi-square in the thousands)."""
    probs = torch.softmax(torch.tensor(SAMPLER_ROW, dtype=torch.float64), -1)
    for tp in TP_SIZES:
        ranks = by_tp[tp]
        samples = ranks[0]["sampler"][sampler]
        for r in ranks[1:]:
            assert torch.equal(r["sampler"][sampler], samples)
        assert samples.min() >= 0 and samples.max() < len(SAMPLER_ROW)
        counts = torch.bincount(samples, minlength=len(SAMPLER_ROW)).double()
        expected = probs * SAMPLER_DRAWS
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 27.9, f"TP={tp}: chi-square {chi2:.1f}, counts {counts.tolist()}"
        if sampler == "inverse_cdf":
            agree = (samples == by_tp[1][0]["sampler"][sampler]).double().mean()
            assert agree > 0.999, f"TP={tp}: only {agree:.4f} of the samples match TP=1's"
