"""The chunked, vocab-parallel autograd function behind ``distillation_loss``.

Memory: the forward keeps O(tokens) state (per supervised token: the student's and
teacher's log-sum-exp, the weight sum and, for token methods, two ids and their
weights) and recomputes everything else in the backward. Tokens are processed in
chunks; per chunk it holds a few [chunk, vocab/TP] buffers in the compute dtype
(allocated once per call and reused, which on the CPU also avoids page faults), so the
peak beyond the inputs is the gradient plus a small constant number of chunks.

Each chunk goes through one function per step, in the order ``forward_pass`` lists them
(communication only when TP > 1):

* ``_student_local``, ``_teacher_local``: each model's row maxima, exponential sums and
  logits at the known ids on this rank's shard (no communication, except that full-vocab
  methods move the teacher's columns onto the student's layout when the padded widths
  differ);
* ``_reduce_max``, round 1: an all-reduce MAX of the row maxima (and of the best Gumbel
  score);
* ``_reduce_sums``, round 2: an all-reduce SUM of the rescaled exponential sums and of the
  logits at known ids (non-owners contribute 0), giving the log-sum-exps;
* full-vocab methods, ``_dense_terms``, round 3: a SUM of the vocabulary sums of the
  weights and of the divergence terms;
* HPD drawing its own sample, ``_draw_sample`` and ``_sample_logits``, rounds 3 and 4:
  the sample's id, then both models' logits at it;
* token methods, ``_token_weights``: the weights of y (and yh) (no communication).

Every reduced quantity is detached: each rank ends up with the full per-token value and
computes the gradient of its own shard locally, so no autograd all-reduce over the loss
exists that could multiply gradients by the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from hpd_megatron.losses.methods import FullVocabMethod, PointLogProbs, TokenMethod, TokenWeights
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
    def needs_sample(self) -> bool:
        return self.method.needs_sample

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _real_columns(logits: Tensor, shard: VocabShard) -> Tensor:
    """[tokens, real columns] view of a [..., width] shard: padding never enters a softmax."""
    return logits.reshape(-1, logits.shape[-1])[:, : shard.real_width]


# ---------------------------------------------------------------- chunks and buffers


@dataclass(slots=True)
class Chunk:
    """Consecutive supervised tokens processed together, and their ids."""

    index: int
    part: slice
    """[start, end): the chunk's entries of the per-supervised-token tensors."""
    n: int
    span: tuple[int, int] | None
    """The chunk's rows of the logits as (first, last + 1), when they are consecutive."""
    rows: Tensor
    y: Tensor | None
    """The data token of each row (None in the full-vocab backward, which needs no ids)."""
    given: Tensor | None
    """The caller's sample yh of each row, when the method uses one and it was given."""


def _chunks(
    rows_all: Tensor, chunk_size: int, labels: Tensor | None, given: Tensor | None = None
) -> list[Chunk]:
    """The chunks of the supervised rows, each with its row span when consecutive.

    Consecutive rows (the usual case: a response is one run of supervised positions) are
    read as a view of the logits, fused into the first arithmetic op, instead of being
    gathered into a copy. Computed once on the host, so the loop never syncs a device.
    """
    host = rows_all.cpu()
    out = []
    for index, start in enumerate(range(0, host.numel(), chunk_size)):
        piece = host[start : start + chunk_size]
        first, last = int(piece[0]), int(piece[-1])
        span = (first, last + 1) if last - first + 1 == piece.numel() else None
        n = piece.numel()
        rows = rows_all[start : start + n]
        y = None if labels is None else labels[rows]
        ids = None if given is None else given[rows]
        out.append(Chunk(index, slice(start, start + n), n, span, rows, y, ids))
    return out


class ChunkBuffers:
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


def _chunk_rows(source: Tensor, chunk: Chunk, buffers: ChunkBuffers, name: str) -> Tensor:
    """The chunk's rows of ``source``: a view when consecutive, else gathered (native dtype)."""
    if chunk.span is not None:
        return source[chunk.span[0] : chunk.span[1]]
    out = buffers.get(name, chunk.n, source.shape[1], source.dtype)
    return torch.index_select(source, 0, chunk.rows, out=out)


class LogitSource(Protocol):
    """Where a model's logits of a chunk come from: a materialised tensor, or (fused head,
    ``fused_head.HeadLogits``) the chunk's hidden states times the output-layer shard."""

    def rows(self, chunk: Chunk, buffers: ChunkBuffers, name: str) -> Tensor:
        """[chunk.n, real columns]: the chunk's logits (read only; ``name`` names the buffer)."""
        ...


@dataclass
class MaterialisedLogits:
    """Logits the output layer already produced, as [tokens, real columns]."""

    real: Tensor

    def rows(self, chunk: Chunk, buffers: ChunkBuffers, name: str) -> Tensor:
        return _chunk_rows(self.real, chunk, buffers, name)


def _teacher_rows(
    plan: LossPlan, teacher: LogitSource, chunk: Chunk, buffers: ChunkBuffers
) -> Tensor:
    """The chunk's teacher logits, moved onto the student's layout when full-vocab needs it."""
    source = teacher.rows(chunk, buffers, "teacher_in")
    if plan.realign:
        return realign_columns(
            source, plan.teacher.width, plan.student.width, plan.vocab_size, plan.tp
        )
    return source


def _log_softmaxes(
    buffers: ChunkBuffers, student_rows: Tensor, teacher_rows: Tensor, lse_q: Tensor, lse_p: Tensor
) -> tuple[Tensor, Tensor]:
    """log q and log p of a chunk on the student's layout, in the reused logq/logp buffers."""
    n, width = student_rows.shape
    logq = torch.sub(student_rows, lse_q.unsqueeze(1), out=buffers.get("logq", n, width))
    logp = torch.sub(teacher_rows, lse_p.unsqueeze(1), out=buffers.get("logp", n, width))
    return logq, logp


# ---------------------------------------------------------------- per-call state


@dataclass
class _Call:
    """One forward's logits as [tokens, real columns], its ids, and what it computes."""

    plan: LossPlan
    student: LogitSource
    teacher: LogitSource | None
    labels: Tensor
    """[tokens]: the flattened labels."""
    rows: Tensor
    """The rows of the supervised tokens."""
    dtype: torch.dtype
    """The compute dtype: fp32, fp64 for fp64 logits."""
    buffers: ChunkBuffers
    given: Tensor | None = None
    """[tokens] the caller's samples, when the method uses a sample."""
    draw: str | None = None
    """The sampler that draws the sample in this call (None: given, or no sample used)."""


def _prepare(
    student: Tensor, teacher: Tensor | None, labels: Tensor, sampled: Tensor | None, plan: LossPlan
) -> _Call:
    """The call's flattened inputs, and whether its sample is given or drawn (and how)."""
    dtype = compute_dtype(student.dtype)
    labels = labels.reshape(-1)
    rows = (labels != plan.ignore_index).nonzero().squeeze(1)
    t_source = None
    if teacher is not None and plan.teacher is not None:
        t_source = MaterialisedLogits(_real_columns(teacher, plan.teacher))
    s_source = MaterialisedLogits(_real_columns(student, plan.student))
    return call_of(plan, s_source, t_source, labels, rows, sampled, dtype, student.device)


def call_of(
    plan: LossPlan,
    student: LogitSource,
    teacher: LogitSource | None,
    labels: Tensor,
    rows: Tensor,
    sampled: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> _Call:
    """A call over the given logit sources; the sample is given or drawn (and how)."""
    buffers = ChunkBuffers(min(plan.chunk_size, max(rows.numel(), 1)), device, dtype)
    call = _Call(plan, student, teacher, labels, rows, dtype, buffers)
    if plan.needs_sample and sampled is not None:
        call.given = sampled.reshape(-1)
    elif plan.needs_sample:
        call.draw = plan.sampler
    return call


@dataclass
class _PerToken:
    """The forward's per-supervised-token results, filled chunk by chunk (compute dtype)."""

    lse_q: Tensor
    lse_p: Tensor
    sum_w: Tensor
    """sum_v w(v): the gradient with respect to logit j is sum_w q_j - w_j."""
    values: Tensor
    cross_entropy: Tensor
    coef_y: Tensor
    coef_s: Tensor
    samples: Tensor
    """long: the sample yh, for the methods that use one."""
    stats: dict[str, list[Tensor]] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n: int, dtype: torch.dtype, device: torch.device) -> _PerToken:
        values = [torch.zeros(n, dtype=dtype, device=device) for _ in range(7)]
        return cls(*values, samples=torch.zeros(n, dtype=torch.long, device=device))

    def put_weights(self, part: slice, weights: TokenWeights, dtype: torch.dtype) -> None:
        self.coef_y[part] = weights.coef_y
        if weights.coef_s is not None:
            self.coef_s[part] = weights.coef_s
        self.values[part] = weights.value
        self.sum_w[part] = self.coef_y[part] + self.coef_s[part]
        for name, value in weights.stats.items():
            self.stats.setdefault(name, []).append(value.to(dtype))

    def finish(self, call: _Call) -> tuple[Tensor, dict[str, Tensor], ForwardRecord]:
        """The loss sum, the tensors the backward needs, and the record for diagnostics."""
        record = ForwardRecord(
            rows=call.rows,
            values=self.values,
            cross_entropy=self.cross_entropy,
            stats={name: torch.cat(parts) for name, parts in self.stats.items()},
            sampled=self.samples if call.plan.needs_sample else None,
        )
        saved = dict(
            rows=call.rows,
            lse_q=self.lse_q,
            lse_p=self.lse_p,
            sum_w=self.sum_w,
            coef_y=self.coef_y,
            coef_s=self.coef_s,
            labels=call.labels,
            samples=self.samples,
        )
        return self.values.double().sum().to(call.dtype), saved, record


# ---------------------------------------------------------------- local statistics


@dataclass(slots=True)
class _Local:
    """One model's statistics of a chunk on this rank's shard, before any communication."""

    logits: Tensor
    """[n, columns]: the chunk's logits (a view of the input when its rows are consecutive)."""
    row_max: Tensor
    exp_sum: Tensor
    """sum exp(z - row_max) over this shard."""
    at_y: Tensor | None = None
    """float64 logit at the data token where this rank owns it, else 0 (token methods)."""
    at_sample: Tensor | None = None
    """The same at the given sample."""
    running: Tensor | None = None
    """Student, inverse-CDF draw: running sums of exp(z - row_max), searched in round 3."""
    gumbel: tuple[Tensor, Tensor] | None = None
    """Student, Gumbel draw: the best local score and its local column."""


def _row_max(x: Tensor) -> Tensor:
    if x.shape[-1] == 0:
        return torch.full((x.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
    return x.amax(dim=-1)


def _exp_below_max(logits: Tensor, work: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The row maxima (compute dtype) and exp(z - row max), written into ``work``."""
    row_max = _row_max(logits).to(dtype)
    return row_max, torch.sub(logits, row_max.unsqueeze(1), out=work).exp_()


def _owned_value(logits: Tensor, ids: Tensor, shard: VocabShard) -> Tensor:
    """float64 logit of each chunk row at its global id where this rank owns it, else 0
    (for a SUM); ``logits`` are the chunk's [n, real columns]."""
    if shard.real_width == 0:
        return torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    n = torch.arange(logits.shape[0], device=logits.device)
    values = logits[n, shard.local(ids)].double()
    return torch.where(shard.owns(ids), values, 0.0)


def _student_local(call: _Call, chunk: Chunk) -> _Local:
    """The student chunk's statistics; its logits are only read, never written."""
    shard = call.plan.student
    logits = call.student.rows(chunk, call.buffers, "student_in")
    work = call.buffers.get("work", chunk.n, shard.real_width)
    gumbel = None
    if call.draw == "gumbel":
        # Before the exponentials: the scores use ``work`` as scratch.
        seed, rank = call.plan.gumbel_seed, call.plan.tp.rank
        gumbel = gumbel_scores(logits, work, chunk_generator(seed, chunk.index, rank, work.device))
    row_max, exps = _exp_below_max(logits, work, call.dtype)
    # The inverse-CDF draw needs the running sums, whose last column is the row's total.
    running = exps if call.draw == "inverse_cdf" else None
    exp_sum = running_mass_(exps) if running is not None else exps.sum(dim=-1)
    at_y = _owned_value(logits, chunk.y, shard)
    at_sample = None
    if chunk.given is not None:
        at_sample = _owned_value(logits, chunk.given, shard)
    return _Local(logits, row_max, exp_sum, at_y, at_sample, running, gumbel)


def _teacher_local(call: _Call, chunk: Chunk) -> _Local:
    """The teacher chunk's statistics (on the student's layout for the full-vocab methods)."""
    plan = call.plan
    logits = _teacher_rows(plan, call.teacher, chunk, call.buffers)
    # The student's running sums must survive until the sample is drawn; the full-vocab
    # methods draw none, so they reuse the student's scratch buffer.
    work = call.buffers.get("work" if plan.dense else "teacher_work", chunk.n, logits.shape[1])
    row_max, exps = _exp_below_max(logits, work, call.dtype)
    local = _Local(logits, row_max, exps.sum(dim=-1))
    if not plan.dense:
        local.at_y = _owned_value(logits, chunk.y, plan.teacher)
        if chunk.given is not None:
            local.at_sample = _owned_value(logits, chunk.given, plan.teacher)
    return local


# ---------------------------------------------------------------- rounds 1 and 2


def _reduce_max(call: _Call, student: _Local, teacher: _Local | None) -> Tensor:
    """Round 1: all-reduce MAX of the row maxima [student, teacher?, best Gumbel score?]."""
    local = [student.row_max]
    if teacher is not None:
        local.append(teacher.row_max)
    if student.gumbel is not None:
        local.append(student.gumbel[0])
    return all_reduce_(torch.stack(local), dist.ReduceOp.MAX, call.plan.tp)


@dataclass(slots=True)
class _Totals:
    """A chunk's per-token values after rounds 1 and 2, the same on every rank (float64)."""

    maxima: Tensor
    """Round 1's global maxima [student, teacher?, best Gumbel score?] (compute dtype)."""
    max_s: Tensor
    """The student's row (``maxima[0]``)."""
    masses: Tensor
    """[TP, n] each rank's student mass sum exp(z - global max) (inverse CDF), else [1, n]."""
    lse_s: Tensor
    """The student's log-sum-exp."""
    logq_y: Tensor
    lse_t: Tensor | None = None
    t_y: Tensor | None = None
    """The teacher's logit at the data token (token methods)."""
    at_given: tuple[Tensor, Tensor | None] | None = None
    """Both models' logits at the given sample."""


def _rescaled(total: Tensor, local_max: Tensor, global_max: Tensor) -> Tensor:
    """sum exp(z - local max) expressed relative to the global max (float64)."""
    return total.double() * torch.exp(local_max.double() - global_max.double())


def _reduce_sums(call: _Call, student: _Local, teacher: _Local | None, maxima: Tensor) -> _Totals:
    """Round 2: all-reduce SUM of the rescaled exponential sums and of the logits at known ids.

    For the inverse-CDF draw the student's mass stays per rank (each rank fills its own
    row of a [TP, n] block): round 3 picks the rank that owns the sample from it.
    """
    tp, per_rank = call.plan.tp, call.draw == "inverse_cdf"
    mass_rows = tp.size if per_rank else 1
    masses = torch.zeros(mass_rows, maxima.shape[1], dtype=torch.float64, device=maxima.device)
    max_s = maxima[0]
    masses[tp.rank if per_rank else 0] = _rescaled(student.exp_sum, student.row_max, max_s)
    named = {"z_y": student.at_y}
    if teacher is not None:
        max_t = maxima[1]
        named["t_mass"] = _rescaled(teacher.exp_sum, teacher.row_max, max_t)
        if teacher.at_y is not None:
            named["t_y"] = teacher.at_y
    if student.at_sample is not None:
        named["z_sample"] = student.at_sample
        if teacher is not None:
            named["t_sample"] = teacher.at_sample
    summed = torch.cat([masses, torch.stack(list(named.values()))])
    reduced = all_reduce_(summed, dist.ReduceOp.SUM, tp)
    masses = reduced[:mass_rows]
    got = {name: reduced[mass_rows + i] for i, name in enumerate(named)}
    lse_s = max_s.double() + masses.sum(dim=0).log()
    totals = _Totals(maxima, max_s, masses, lse_s, got["z_y"] - lse_s, t_y=got.get("t_y"))
    if teacher is not None:
        totals.lse_t = max_t.double() + got["t_mass"].log()
    if "z_sample" in got:
        totals.at_given = (got["z_sample"], got.get("t_sample"))
    return totals


def _put_normalisers(out: _PerToken, part: slice, totals: _Totals, dtype: torch.dtype) -> None:
    """Keep the log-sum-exps (for the backward) and the data token's cross-entropy."""
    out.lse_q[part] = totals.lse_s.to(dtype)
    out.cross_entropy[part] = (-totals.logq_y).to(dtype)
    if totals.lse_t is not None:
        out.lse_p[part] = totals.lse_t.to(dtype)


# ---------------------------------------------------------------- round 3: full vocabulary


def _dense_terms(
    call: _Call, chunk: Chunk, student: _Local, teacher: _Local, out: _PerToken
) -> None:
    """Round 3 of the full-vocab methods: all-reduce SUM of the per-token sums of w(v)
    and of the divergence terms over each shard."""
    lse_q, lse_p = out.lse_q[chunk.part], out.lse_p[chunk.part]
    logq, logp = _log_softmaxes(call.buffers, student.logits, teacher.logits, lse_q, lse_p)
    w, terms = call.plan.method.terms(logq, logp, call.plan.param, True)
    sums = torch.stack([w.sum(dim=-1), terms.sum(dim=-1)]).double()
    del w, terms  # two [chunk, vocab/TP] temporaries: gone before the collective
    sums = all_reduce_(sums, dist.ReduceOp.SUM, call.plan.tp)
    out.sum_w[chunk.part] = sums[0].to(call.dtype)
    out.values[chunk.part] = sums[1].to(call.dtype)


# ---------------------------------------------------------------- rounds 3 and 4: the sample


def _draw_sample(call: _Call, chunk: Chunk, student: _Local, totals: _Totals) -> Tensor:
    """Round 3 of HPD drawing its own sample: the sample's global id, on every rank."""
    plan, tp, shard = call.plan, call.plan.tp, call.plan.student
    if call.draw == "inverse_cdf":
        local_scale = torch.exp(student.row_max.double() - totals.max_s.double())
        u = plan.uniforms[chunk.rows]
        owned, ids, _ = inverse_cdf_pick(totals.masses, u, student.running, local_scale, shard, tp)
        # Only the owning rank contributes its id, so the SUM hands it to every rank.
        pick = torch.stack([torch.where(owned, ids.double(), 0.0)])
        return all_reduce_(pick, dist.ReduceOp.SUM, tp)[0].round().long()
    best, column = student.gumbel
    winner = best == totals.maxima[-1]
    # Ranks that tie on the best score exactly: the smallest id wins (2**53: not a winner).
    candidate = torch.where(winner, (shard.start + column).double(), float(2**53))
    return all_reduce_(candidate.unsqueeze(0), dist.ReduceOp.MIN, tp)[0].round().long()


def _sample_logits(
    call: _Call, ids: Tensor, student: _Local, teacher: _Local | None
) -> tuple[Tensor, Tensor | None]:
    """Round 4: all-reduce SUM of both models' logits at the drawn ids (non-owners add 0)."""
    point = [_owned_value(student.logits, ids, call.plan.student)]
    if teacher is not None:
        point.append(_owned_value(teacher.logits, ids, call.plan.teacher))
    point = all_reduce_(torch.stack(point), dist.ReduceOp.SUM, call.plan.tp)
    return point[0], (point[1] if teacher is not None else None)


def _sample(
    call: _Call, chunk: Chunk, student: _Local, teacher: _Local | None, totals: _Totals
) -> tuple[Tensor, Tensor, Tensor | None]:
    """yh and both models' float64 logits at it: given (reduced in round 2) or drawn."""
    if chunk.given is not None:
        return (chunk.given, *totals.at_given)
    ids = _draw_sample(call, chunk, student, totals)
    return (ids, *_sample_logits(call, ids, student, teacher))


# ---------------------------------------------------------------- token weights


def _token_weights(
    call: _Call,
    chunk: Chunk,
    totals: _Totals,
    sample: tuple[Tensor, Tensor, Tensor | None] | None,
    out: _PerToken,
) -> None:
    """The token method's weights of y (and yh) and its value; no communication."""
    dtype = call.dtype
    logq_s = logp_s = same = None
    if sample is not None:
        ids, z_sample, t_sample = sample
        out.samples[chunk.part] = ids
        logq_s = (z_sample - totals.lse_s).to(dtype)
        logp_s = (t_sample - totals.lse_t).to(dtype) if t_sample is not None else None
        same = ids == chunk.y
    logp_y = (totals.t_y - totals.lse_t).to(dtype) if totals.lse_t is not None else None
    point = PointLogProbs(totals.logq_y.to(dtype), logp_y, logq_s, logp_s, same)
    out.put_weights(chunk.part, call.plan.method.weights(point), dtype)


def forward_pass(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    sampled_tokens: Tensor | None,
    plan: LossPlan,
) -> tuple[Tensor, dict[str, Tensor], ForwardRecord]:
    """Loss sum over supervised tokens, the state the backward needs, and the record."""
    return forward_chunks(_prepare(student, teacher, labels, sampled_tokens, plan))


def forward_chunks(call: _Call) -> tuple[Tensor, dict[str, Tensor], ForwardRecord]:
    """The forward of a prepared call, chunk by chunk (the rounds in the module doc)."""
    plan = call.plan
    out = _PerToken.zeros(call.rows.numel(), call.dtype, call.rows.device)
    for chunk in _chunks(call.rows, plan.chunk_size, call.labels, call.given):
        s_local = _student_local(call, chunk)
        t_local = _teacher_local(call, chunk) if call.teacher is not None else None
        maxima = _reduce_max(call, s_local, t_local)  # round 1
        totals = _reduce_sums(call, s_local, t_local, maxima)  # round 2
        _put_normalisers(out, chunk.part, totals, call.dtype)
        if plan.dense:
            _dense_terms(call, chunk, s_local, t_local, out)  # round 3
            continue
        # A drawn sample takes rounds 3 and 4; a given one came with round 2.
        sample = _sample(call, chunk, s_local, t_local, totals) if plan.needs_sample else None
        _token_weights(call, chunk, totals, sample, out)
    return out.finish(call)


# ---------------------------------------------------------------- backward


def _empty_gradient(z2d: Tensor, shard: VocabShard, n_sup: int) -> Tensor:
    """The [tokens, width] gradient, already 0 wherever no chunk writes."""
    if n_sup == z2d.shape[0]:
        grad = torch.empty_like(z2d)
        grad[:, shard.real_width :].zero_()  # padding columns get no gradient
        return grad
    return torch.zeros_like(z2d)


def subtract_point_weights_(
    out: Tensor, points: list[tuple[Tensor, Tensor]], shard: VocabShard, grad_scale: float
) -> None:
    """Token methods: subtract each (ids, weights) pair's weights at its columns in ``shard``
    (the columns ``out`` holds)."""
    if not shard.real_width:
        return
    for ids, coef in points:
        weight = torch.where(shard.owns(ids), -grad_scale * coef, 0.0)
        out.scatter_add_(1, shard.local(ids).unsqueeze(1), weight.unsqueeze(1))


def logit_gradient_(
    out: Tensor,
    logits: Tensor,
    teacher: Tensor | None,
    rows: slice,
    saved: dict[str, Tensor],
    plan: LossPlan,
    grad_scale: float,
    buffers: ChunkBuffers,
) -> Tensor:
    """grad_scale * (sum_w q_j - w_j) of a block of logits (the supervised rows ``rows``,
    any columns) into ``out``; token methods' point weights are subtracted by the caller."""
    lse_q = saved["lse_q"][rows].unsqueeze(1)
    scaled_sum = (saved["sum_w"][rows] * grad_scale).unsqueeze(1)
    if not plan.dense:
        return torch.sub(logits, lse_q, out=out).exp_().mul_(scaled_sum)
    lse_p = saved["lse_p"][rows]
    logq, logp = _log_softmaxes(buffers, logits, teacher, lse_q.squeeze(1), lse_p)
    w, _ = plan.method.terms(logq, logp, plan.param, False)
    return torch.exp(logq, out=out).mul_(scaled_sum).sub_(w, alpha=grad_scale)


def _store_rows(grad_real: Tensor, out: Tensor, chunk: Chunk) -> None:
    """Copy a chunk computed in the scratch buffer into the gradient's rows."""
    if chunk.span is not None:
        grad_real[chunk.span[0] : chunk.span[1]].copy_(out)
    else:
        rows = out if out.dtype == grad_real.dtype else out.to(grad_real.dtype)
        grad_real.index_copy_(0, chunk.rows, rows)


def backward_pass(
    grad_scale: float,
    student: Tensor,
    teacher: Tensor | None,
    saved: dict[str, Tensor],
    plan: LossPlan,
) -> Tensor:
    """d(loss_sum)/d(student logits) * grad_scale, shard-local: grad_j = sum_w q_j - w_j."""
    shard, rows_all, dtype = plan.student, saved["rows"], compute_dtype(student.dtype)
    z_real = MaterialisedLogits(_real_columns(student, shard))
    grad = _empty_gradient(student.reshape(-1, student.shape[-1]), shard, rows_all.numel())
    grad_real = grad[:, : shard.real_width]
    t_real = None
    if plan.dense and teacher is not None:
        t_real = MaterialisedLogits(_real_columns(teacher, plan.teacher))
    buffers = ChunkBuffers(min(plan.chunk_size, max(rows_all.numel(), 1)), student.device, dtype)
    labels = None if plan.dense else saved["labels"]
    for chunk in _chunks(rows_all, plan.chunk_size, labels):
        logits = z_real.rows(chunk, buffers, "student_in")
        teacher_rows = _teacher_rows(plan, t_real, chunk, buffers) if plan.dense else None
        # Write straight into the gradient when its rows are consecutive and in the compute dtype.
        direct = chunk.span is not None and grad.dtype == dtype
        if direct:
            out = grad_real[chunk.span[0] : chunk.span[1]]
        else:
            out = buffers.get("grad", chunk.n, shard.real_width)
        logit_gradient_(out, logits, teacher_rows, chunk.part, saved, plan, grad_scale, buffers)
        if not plan.dense:
            points = [(chunk.y, saved["coef_y"][chunk.part])]
            points.append((saved["samples"][chunk.part], saved["coef_s"][chunk.part]))
            subtract_point_weights_(out, points, shard, grad_scale)
        if not direct:
            _store_rows(grad_real, out, chunk)
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
