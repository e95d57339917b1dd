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
# The fused head: hidden states [seq, batch, h] and output weights of both models.
HEAD_SHAPE, STUDENT_H, TEACHER_H = (8, 3), 12, 20


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
    out["fused"] = _fused_checks(rank, tp)

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


def _head_inputs():
    g = torch.Generator().manual_seed(6)
    seq, batch = HEAD_SHAPE
    hidden = torch.randn(seq, batch, STUDENT_H, generator=g)
    teacher_hidden = torch.randn(seq, batch, TEACHER_H, generator=g)
    weight = torch.randn(STUDENT_ROWS, STUDENT_H, generator=g) * 0.8
    teacher_weight = torch.randn(TEACHER_ROWS, TEACHER_H, generator=g) * 0.8
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels.view(-1)[::4] = -100
    sampled = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return hidden, teacher_hidden, weight, teacher_weight, labels, sampled


def _saved(loss: torch.Tensor, name: str) -> torch.Tensor:
    """A tensor the loss's autograd function saved for its backward (by the kernel's name)."""
    node = loss.grad_fn
    offset = len(node.saved_tensors) - len(node.names)
    return node.saved_tensors[offset + node.names.index(name)]


def _fused_checks(rank: int, tp: int) -> dict:
    """Per method (and HPD per sampler): the unfused loss on materialised logits and the
    fused one, each with its gradients to the hidden states and the weight shard and the
    samples it used; the fused one also with sequence parallelism."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from hpd_megatron.losses import distillation_loss
    from hpd_megatron.losses.distillation import fused_distillation_loss
    from hpd_megatron.losses.fused_head import OutputHead, align_teacher_weight
    from hpd_megatron.losses.vocab_parallel import resolve_tp_group

    hidden, t_hidden, weight, t_weight, labels, sampled = _head_inputs()
    weight, t_weight = _shard(weight.t(), rank, tp).t(), _shard(t_weight.t(), rank, tp).t()
    aligned = align_teacher_weight(t_weight, weight.shape[0], VOCAB, resolve_tp_group())
    # Chunks of 8 rows: below that the CPU's GEMM takes another path, whose fp32 rounding
    # the backward (all rows at once) would not repeat.
    common = dict(vocab_size=VOCAB, alpha=0.3, beta=0.4, reduction="sum", chunk_size=8)
    seq_part = HEAD_SHAPE[0] // tp

    def unfused(method, sampling):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        # As Megatron's ColumnParallelLinear: the input's gradient is summed over TP ranks.
        logits = (copy_to_tensor_model_parallel_region(h) @ w.t()).transpose(0, 1)
        teacher = (t_hidden @ t_weight.t()).transpose(0, 1)
        loss, diag = distillation_loss(logits, teacher, labels, method, sampling=sampling, **common)
        return loss, (h, w), diag

    def fused(method, sampling, sp=False):
        h, w = hidden.clone(), weight.clone().requires_grad_()
        th = t_hidden
        if sp:
            h, th = (x[rank * seq_part : (rank + 1) * seq_part] for x in (h, th))
        h.requires_grad_()
        student, teacher = OutputHead(h, w, sp), OutputHead(th, aligned, sp)
        loss, diag = fused_distillation_loss(
            student, teacher, labels, method, sampling=sampling, **common
        )
        return loss, (h, w), diag

    def run(make, *args):
        loss, inputs, diag = make(*args)
        samples = _saved(loss, "samples").clone()
        grads = torch.autograd.grad(loss, inputs)
        return loss.detach(), grads, samples, {k: v.double() for k, v in diag.items()}

    out = {}
    cases = [(m, SamplingOptions(sampled_tokens=sampled)) for m in METHODS]
    cases += [("hpd", SamplingOptions(sampler=s, seed=9)) for s in ("inverse_cdf", "gumbel")]
    for method, sampling in cases:
        key = method if sampling.sampled_tokens is not None else f"hpd:{sampling.sampler}"
        out[key] = {
            "unfused": run(unfused, method, sampling),
            "fused": run(fused, method, sampling),
            "fused_sp": run(fused, method, sampling, True),
        }

    def masked():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        no_loss = torch.full_like(labels, -100)
        student, teacher = OutputHead(h, w), OutputHead(t_hidden, aligned)
        loss, diag = fused_distillation_loss(student, teacher, no_loss, "hpd", **common)
        return loss, (h, w), diag

    out["masked"] = run(masked)
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


def _head_cases(by_tp) -> list[str]:
    return [key for key in by_tp[1][0]["fused"] if key != "masked"]


def _close(actual, expected, what: str, rtol: float = 1e-6) -> None:
    """Relative error ||actual - expected|| / ||expected|| within ``rtol`` (a norm: tvd's
    sign(p - q) may flip on one entry where the two GEMMs round p = q differently)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm())
    assert error <= rtol * scale or error < 1e-12, f"{what}: relative error {error / scale:.3g}"


@pytest.mark.parametrize("tp", TP_SIZES)
def test_fused_head_equals_the_materialised_logits(by_tp, tp):
    """fp32: the fused head's value and gradients (hidden states, weight shard) within 1e-6
    of the unfused path on the same rank, with the same samples, for every method."""
    for rank, result in enumerate(by_tp[tp]):
        for case in _head_cases(by_tp):
            ref, got = result["fused"][case]["unfused"], result["fused"][case]["fused"]
            where = f"TP={tp} rank {rank} {case}"
            _close(got[0], ref[0], f"{where}: loss")
            for name, a, b in zip(("hidden", "weight"), got[1], ref[1]):
                _close(a, b, f"{where}: {name} gradient")
            assert torch.equal(got[2], ref[2]), f"{where}: samples differ"
            for name, value in ref[3].items():
                _close(got[3][name], value, f"{where}: {name}", rtol=1e-5)


@pytest.mark.parametrize("tp", TP_SIZES[1:])
def test_fused_head_is_tp_invariant_and_sequence_parallel_exact(by_tp, tp):
    """TP = 2 and 4 give TP = 1's fused loss and gradients (weight shards concatenated) up
    to fp32 reduction order (1e-5); with sequence parallelism each rank's hidden gradient
    is its slice of the full one."""
    part = HEAD_SHAPE[0] // tp
    for case in _head_cases(by_tp):
        if case.endswith("gumbel"):
            continue  # Gumbel noise is drawn per rank: samples depend on the layout
        base = by_tp[1][0]["fused"][case]["fused"]
        ranks = [r["fused"][case] for r in by_tp[tp]]
        weight = torch.cat([r["fused"][1][1] for r in ranks])
        _close(
            weight[: base[1][1].shape[0]], base[1][1][: weight.shape[0]], f"{case}: weight", 1e-5
        )
        for rank, r in enumerate(ranks):
            _close(r["fused"][0], base[0], f"TP={tp} {case}: loss", 1e-5)
            _close(r["fused"][1][0], base[1][0], f"TP={tp} {case}: hidden gradient", 1e-5)
            _close(r["fused_sp"][0], r["fused"][0], f"TP={tp} SP {case}: loss")
            rows = slice(rank * part, (rank + 1) * part)
            _close(r["fused_sp"][1][0], r["fused"][1][0][rows], f"TP={tp} SP {case}: hidden")
            _close(r["fused_sp"][1][1], r["fused"][1][1], f"TP={tp} SP {case}: weight")


def test_fused_head_all_masked(by_tp):
    for tp in TP_SIZES:
        for r in by_tp[tp]:
            loss, grads, _, diag = r["fused"]["masked"]
            assert float(loss) == 0.0 and int(diag["num_tokens"]) == 0
            assert all(torch.all(g == 0) for g in grads)
