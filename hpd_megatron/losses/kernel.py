"""The chunked, vocab-parallel autograd function behind ``distillation_loss``.

Memory: the forward keeps O(tokens) state (per supervised token: the student's and
teacher's log-sum-exp, the weight sum and, for token methods, two ids and their
weights) and recomputes everything else in the backward. Tokens are processed in
chunks; per chunk it holds a few [chunk, vocab/TP] buffers in the compute dtype
(allocated once per call and reused, which on the CPU also avoids page faults), so the
peak beyond the inputs is the gradient plus a small constant number of chunks.

Communication per chunk (nothing when TP = 1): an all-reduce MAX of the row maxima, an
all-reduce SUM of the rescaled exponential sums and of the logits at known ids
(non-owners contribute 0), and, depending on the method, a SUM of the vocabulary sums
(full-vocab) or two rounds for the sampled token's id and logits (HPD). Every reduced
quantity is detached: each rank ends up with the full per-token value and computes the
gradient of its own shard locally, so no autograd all-reduce over the loss exists that
could multiply gradients by the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hpd_megatron.losses.methods import FullVocabMethod, PointLogProbs, TokenMethod
from hpd_megatron.losses.sampling import (
    chunk_generator,
    gumbel_scores,
    inverse_cdf_pick,
    running_mass_,
)
from hpd_megatron.losses.vocab_parallel import TPGroup, VocabShard, all_reduce_, realign_columns

DEFAULT_CHUNK_ELEMENTS = 2**22
"""Default chunk: this many elements of the widest shard (4 Mi: 16 MiB per fp32 buffer,
e.g. 131 tokens of a 32,000-entry shard; small enough for glibc to recycle on the CPU)."""


@dataclass
class LossPlan:
    """Everything the kernel needs besides the tensors (identical on all TP ranks)."""

    method: FullVocabMethod | TokenMethod
    param: float
    vocab_size: int
    tp: TPGroup
    student: VocabShard
    teacher: VocabShard | None
    chunk_size: int
    ignore_index: int = -100
    sampler: str = "inverse_cdf"
    uniforms: Tensor | None = None
    """[positions] float64 for the inverse-CDF sampler."""
    gumbel_seed: int | None = None

    @property
    def dense(self) -> bool:
        return isinstance(self.method, FullVocabMethod)

    @property
    def realign(self) -> bool:
        """Full-vocab methods need teacher and student columns of the same ids on a rank."""
        return (
            self.dense
            and self.tp.size > 1
            and self.teacher is not None
            and self.teacher.width != self.student.width
        )


@dataclass
class ForwardRecord:
    """Per-supervised-token results of the forward (detached), for diagnostics."""

    rows: Tensor | None = None
    values: Tensor | None = None
    cross_entropy: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    sampled: Tensor | None = None
    """[supervised tokens] long: the sample yh of each supervised position, when drawn."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(rows_all: Tensor, chunk_size: int) -> list[tuple[int, int, tuple[int, int] | None]]:
    """(start, end) into the supervised rows per chunk, and the row span when consecutive.

    Consecutive rows (the usual case: a response is one run of supervised positions) are
    read as a view of the logits, fused into the first arithmetic op, instead of being
    gathered into a copy. Computed once on the host, so the loop never syncs a device.
    """
    host = rows_all.cpu()
    out = []
    for start in range(0, host.numel(), chunk_size):
        piece = host[start : start + chunk_size]
        first, last = int(piece[0]), int(piece[-1])
        span = (first, last + 1) if last - first + 1 == piece.numel() else None
        out.append((start, start + piece.numel(), span))
    return out


class _Buffers:
    """Per-call [chunk, width] buffers, allocated on first use and reused by every chunk."""

    def __init__(self, rows: int, device: torch.device, dtype: torch.dtype):
        self.rows, self.device, self.dtype = rows, device, dtype
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, n: int, width: int, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.dtype
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[1] != width or buffer.dtype != dtype:
            buffer = torch.empty(self.rows, width, device=self.device, dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:n]


def _chunk_rows(
    source: Tensor, rows: Tensor, span: tuple[int, int] | None, buffers: _Buffers, name: str
) -> Tensor:
    """The chunk's rows of ``source``: a view when consecutive, else gathered (native dtype)."""
    if span is not None:
        return source[span[0] : span[1]]
    out = buffers.get(name, rows.numel(), source.shape[1], source.dtype)
    return torch.index_select(source, 0, rows, out=out)


def _row_max(x: Tensor) -> Tensor:
    if x.shape[-1] == 0:
        return torch.full((x.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
    return x.amax(dim=-1)


def _owned_value(source: Tensor, rows: Tensor, ids: Tensor, shard: VocabShard) -> Tensor:
    """float64 logit at each global id where this rank owns it, else 0 (for a SUM)."""
    if shard.real_width == 0:
        return torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    values = source[rows, shard.local(ids)].double()
    return torch.where(shard.owns(ids), values, 0.0)


def _rescaled(total: Tensor, local_max: Tensor, global_max: Tensor) -> Tensor:
    """sum exp(z - local max) expressed relative to the global max (float64)."""
    return total.double() * torch.exp(local_max.double() - global_max.double())


def _teacher_rows(
    plan: LossPlan, t_real: Tensor, rows: Tensor, span: tuple[int, int] | None, buffers: _Buffers
) -> Tensor:
    """The chunk's teacher logits, moved onto the student's layout when full-vocab needs it."""
    source = _chunk_rows(t_real, rows, span, buffers, "teacher_in")
    if plan.realign:
        return realign_columns(
            source, plan.teacher.width, plan.student.width, plan.vocab_size, plan.tp
        )
    return source


def forward_pass(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    sampled_tokens: Tensor | None,
    plan: LossPlan,
) -> tuple[Tensor, dict[str, Tensor], ForwardRecord]:
    """Loss sum over supervised tokens, the state the backward needs, and the record."""
    tp, shard, method = plan.tp, plan.student, plan.method
    cdt = _compute_dtype(student.dtype)
    z2d = student.reshape(-1, student.shape[-1])
    z_real = z2d[:, : shard.real_width]
    t_real = None
    if teacher is not None and plan.teacher is not None:
        t_real = teacher.reshape(-1, teacher.shape[-1])[:, : plan.teacher.real_width]
    labels = labels.reshape(-1)
    rows_all = (labels != plan.ignore_index).nonzero().squeeze(1)
    n_sup = rows_all.numel()
    device = z2d.device

    needs_sample = isinstance(method, TokenMethod) and method.needs_sample
    draw = needs_sample and sampled_tokens is None
    inverse_cdf = draw and plan.sampler == "inverse_cdf"
    gumbel = draw and plan.sampler == "gumbel"
    use_teacher = t_real is not None
    samples_in = sampled_tokens.reshape(-1) if sampled_tokens is not None else None

    def per_token(dtype: torch.dtype = cdt) -> Tensor:
        return torch.zeros(n_sup, dtype=dtype, device=device)

    lse_q, lse_p, sum_w, values, ce = (
        per_token(),
        per_token(),
        per_token(),
        per_token(),
        per_token(),
    )
    coef_y, coef_s = per_token(), per_token()
    samples = torch.zeros(n_sup, dtype=torch.long, device=device)
    stats: dict[str, list[Tensor]] = {}
    buffers = _Buffers(min(plan.chunk_size, max(n_sup, 1)), device, cdt)

    for index, (start, end, span) in enumerate(_chunks(rows_all, plan.chunk_size)):
        rows = rows_all[start:end]
        n = end - start
        y = labels[rows]

        # --- local statistics of the student chunk (its logits are only read, never written)
        zc = _chunk_rows(z_real, rows, span, buffers, "student_in")
        z_y = _owned_value(z_real, rows, y, shard)
        if samples_in is not None and needs_sample:
            y_s = samples_in[rows]
            z_s = _owned_value(z_real, rows, y_s, shard)
        work = buffers.get("work", n, shard.real_width)
        if gumbel:
            generator = chunk_generator(plan.gumbel_seed, index, tp.rank, device)
            best, column = gumbel_scores(zc, work, generator)
        m_s = _row_max(zc).to(cdt)
        exps = torch.sub(zc, m_s.unsqueeze(1), out=work).exp_()
        s_s = running_mass_(exps) if inverse_cdf else exps.sum(dim=-1)

        # --- local statistics of the teacher chunk
        if use_teacher:
            tc = _teacher_rows(plan, t_real, rows, span, buffers)
            if not plan.dense:
                t_y = _owned_value(t_real, rows, y, plan.teacher)
                if samples_in is not None:
                    t_s = _owned_value(t_real, rows, y_s, plan.teacher)
            m_t = _row_max(tc).to(cdt)
            # The student's running sums must survive until the sample is drawn.
            t_work = buffers.get("work" if plan.dense else "teacher_work", n, tc.shape[1])
            s_t = torch.sub(tc, m_t.unsqueeze(1), out=t_work).exp_().sum(dim=-1)

        # --- round 1: global maxima (and the best Gumbel score)
        local_max = [m_s] + ([m_t] if use_teacher else []) + ([best] if gumbel else [])
        global_max = all_reduce_(torch.stack(local_max), dist.ReduceOp.MAX, tp)
        gm_s = global_max[0]

        # --- round 2: exponential sums (per rank for the sampler) and logits at known ids
        mass_rows = tp.size if inverse_cdf else 1
        masses = torch.zeros(mass_rows, n, dtype=torch.float64, device=device)
        masses[tp.rank if inverse_cdf else 0] = _rescaled(s_s, m_s, gm_s)
        summed = [z_y]
        if use_teacher:
            summed.append(_rescaled(s_t, m_t, global_max[1]))
            if not plan.dense:
                summed.append(t_y)
        if samples_in is not None and needs_sample:
            summed += [z_s] + ([t_s] if use_teacher else [])
        reduced = all_reduce_(torch.cat([masses, torch.stack(summed)]), dist.ReduceOp.SUM, tp)
        masses, reduced = reduced[:mass_rows], reduced[mass_rows:]
        lse_s64 = gm_s.double() + masses.sum(dim=0).log()
        lse_q[start:end] = lse_s64.to(cdt)
        logq_y = reduced[0] - lse_s64
        ce[start:end] = (-logq_y).to(cdt)
        if use_teacher:
            lse_t64 = global_max[1].double() + reduced[1].log()
            lse_p[start:end] = lse_t64.to(cdt)

        if plan.dense:
            # --- full vocabulary: weights and divergence terms, summed over all shards
            logq = torch.sub(
                zc, lse_q[start:end].unsqueeze(1), out=buffers.get("logq", n, shard.real_width)
            )
            logp = torch.sub(
                tc, lse_p[start:end].unsqueeze(1), out=buffers.get("logp", n, shard.real_width)
            )
            w, terms = method.terms(logq, logp, plan.param, True)
            sums = torch.stack([w.sum(dim=-1), terms.sum(dim=-1)]).double()
            del w, terms
            sums = all_reduce_(sums, dist.ReduceOp.SUM, tp)
            sum_w[start:end] = sums[0].to(cdt)
            values[start:end] = sums[1].to(cdt)
            continue

        # --- the student's sample yh (rounds 3 and 4)
        if needs_sample:
            if samples_in is not None:
                z_s64, t_s64 = (
                    reduced[-2] if use_teacher else reduced[-1],
                    reduced[-1] if use_teacher else None,
                )
            else:
                if inverse_cdf:
                    local_scale = torch.exp(m_s.double() - gm_s.double())
                    owned, ids, _ = inverse_cdf_pick(
                        masses, plan.uniforms[rows], exps, local_scale, shard, tp
                    )
                    pick = torch.stack([torch.where(owned, ids.double(), 0.0)])
                    y_s = all_reduce_(pick, dist.ReduceOp.SUM, tp)[0].round().long()
                else:
                    winner = best == global_max[-1]
                    candidate = torch.where(winner, (shard.start + column).double(), float(2**53))
                    y_s = (
                        all_reduce_(candidate.unsqueeze(0), dist.ReduceOp.MIN, tp)[0].round().long()
                    )
                point = [_owned_value(z_real, rows, y_s, shard)]
                if use_teacher:
                    point.append(_owned_value(t_real, rows, y_s, plan.teacher))
                point = all_reduce_(torch.stack(point), dist.ReduceOp.SUM, tp)
                z_s64, t_s64 = point[0], (point[1] if use_teacher else None)
            samples[start:end] = y_s
            logq_s = (z_s64 - lse_s64).to(cdt)
            logp_s = (t_s64 - lse_t64).to(cdt) if use_teacher else None
            same = y_s == y
        else:
            logq_s = logp_s = same = None

        logp_y = (reduced[2] - lse_t64).to(cdt) if use_teacher else None
        weights = method.weights(PointLogProbs(logq_y.to(cdt), logp_y, logq_s, logp_s, same))
        coef_y[start:end] = weights.coef_y
        if weights.coef_s is not None:
            coef_s[start:end] = weights.coef_s
        values[start:end] = weights.value
        sum_w[start:end] = coef_y[start:end] + coef_s[start:end]
        for name, value in weights.stats.items():
            stats.setdefault(name, []).append(value.to(cdt))

    loss_sum = values.double().sum().to(cdt)
    record = ForwardRecord(
        rows=rows_all,
        values=values,
        cross_entropy=ce,
        stats={name: torch.cat(parts) for name, parts in stats.items()},
        sampled=samples if needs_sample else None,
    )
    saved = dict(
        rows=rows_all,
        lse_q=lse_q,
        lse_p=lse_p,
        sum_w=sum_w,
        coef_y=coef_y,
        coef_s=coef_s,
        labels=labels,
        samples=samples,
    )
    return loss_sum, saved, record


def backward_pass(
    grad_scale: float,
    student: Tensor,
    teacher: Tensor | None,
    saved: dict[str, Tensor],
    plan: LossPlan,
) -> Tensor:
    """d(loss_sum)/d(student logits) * grad_scale, shard-local: grad_j = sum_w q_j - w_j."""
    shard, method = plan.student, plan.method
    cdt = _compute_dtype(student.dtype)
    z2d = student.reshape(-1, student.shape[-1])
    z_real = z2d[:, : shard.real_width]
    rows_all = saved["rows"]
    n_sup = rows_all.numel()
    if n_sup == z2d.shape[0]:
        grad = torch.empty_like(z2d)
        grad[:, shard.real_width :].zero_()  # padding columns get no gradient
    else:
        grad = torch.zeros_like(z2d)
    grad_real = grad[:, : shard.real_width]
    t_real = None
    if plan.dense and teacher is not None:
        t_real = teacher.reshape(-1, teacher.shape[-1])[:, : plan.teacher.real_width]
    buffers = _Buffers(min(plan.chunk_size, max(n_sup, 1)), z2d.device, cdt)

    for start, end, span in _chunks(rows_all, plan.chunk_size):
        rows = rows_all[start:end]
        n = end - start
        zc = _chunk_rows(z_real, rows, span, buffers, "student_in")
        lse_q = saved["lse_q"][start:end].unsqueeze(1)
        scaled_sum = (saved["sum_w"][start:end] * grad_scale).unsqueeze(1)
        # Write straight into the gradient when its rows are consecutive and in the compute dtype.
        direct = span is not None and grad.dtype == cdt
        out = grad_real[span[0] : span[1]] if direct else buffers.get("grad", n, shard.real_width)
        if plan.dense:
            logq = torch.sub(zc, lse_q, out=buffers.get("logq", n, shard.real_width))
            teacher_rows = _teacher_rows(plan, t_real, rows, span, buffers)
            logp = torch.sub(
                teacher_rows,
                saved["lse_p"][start:end].unsqueeze(1),
                out=buffers.get("logp", n, shard.real_width),
            )
            w, _ = method.terms(logq, logp, plan.param, False)
            torch.exp(logq, out=out).mul_(scaled_sum).sub_(w, alpha=grad_scale)
            del w
        else:
            torch.sub(zc, lse_q, out=out).exp_().mul_(scaled_sum)
            if shard.real_width:
                for ids, coef in (
                    (saved["labels"][rows], saved["coef_y"]),
                    (saved["samples"][start:end], saved["coef_s"]),
                ):
                    mine = shard.owns(ids)
                    out.scatter_add_(
                        1,
                        shard.local(ids).unsqueeze(1),
                        torch.where(mine, -grad_scale * coef[start:end], 0.0).unsqueeze(1),
                    )
        if direct:
            continue
        if span is not None:
            grad_real[span[0] : span[1]].copy_(out)
        else:
            grad_real.index_copy_(0, rows, out if out.dtype == grad.dtype else out.to(grad.dtype))
    return grad.view_as(student)


class VocabParallelDistillation(torch.autograd.Function):
    """loss_sum = sum over supervised tokens of the method's value; gradient to the student only."""

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor | None,
        labels: Tensor,
        sampled_tokens: Tensor | None,
        plan: LossPlan,
        record: ForwardRecord,
    ) -> Tensor:
        loss_sum, saved, filled = forward_pass(student, teacher, labels, sampled_tokens, plan)
        record.__dict__.update(filled.__dict__)
        ctx.plan = plan
        ctx.names = list(saved)
        keep_teacher = teacher if plan.dense else None
        ctx.save_for_backward(student, keep_teacher, *saved.values())
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor):
        student, teacher, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.names, rest))
        grad = backward_pass(float(grad_output), student, teacher, saved, ctx.plan)
        return grad, None, None, None, None, None
