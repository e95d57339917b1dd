"""The next token from vocab-parallel logits: greedy, or temperature / top-p sampling.

Every function takes this TP rank's shard ``[n, V/TP]`` of the (padded) output layer and
returns the same values on every TP rank; only ids below ``vocab_size`` are candidates.

- Greedy: each rank's best real column, an all-reduce MAX of the scores, then an
  all-reduce MIN of the ids that reach it (ties go to the smallest id, as torch.argmax).
- Sampling reuses the training sampler (``losses.sample_student_tokens``: exact inverse-CDF
  over the fp32 softmax, with one uniform per row broadcast from TP rank 0) on
  ``logits / temperature``.
- Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
  (the token that crosses it included, as Hugging Face and vLLM do) by masking everything
  below a per-row threshold logit before sampling. Masked entries get the most negative
  finite float, not -inf: the sampler shifts each shard by its own maximum, and a shard
  that is all -inf would become NaN; a finite floor gets exactly zero probability. The
  threshold needs the global order of only the top of the distribution, so each rank sends
  its ``k`` best logits (``k`` = 64, doubled until the exactly ordered part of the gathered
  candidates reaches ``top_p``, at most the shard width); the vocabulary itself never
  travels. Tokens tied with the threshold logit are all kept.
- Entropy of ``softmax(logits / temperature)`` (temperature 1 for greedy), before top-p.
- Per-row draws (``counter_uniforms``): Philox4x32-10 (Salmon et al., SC'11; the generator
  behind cuRAND and torch's CUDA RNG) keyed by each row's seed and counted by position, as
  integer tensor ops on the device: one batched computation for all rows and positions, no
  generator per row, the same value on every rank and at any batch composition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hpd_megatron.losses import SamplingOptions, sample_student_tokens
from hpd_megatron.losses.vocab_parallel import (
    FROM_PARALLEL_STATE,
    TPGroup,
    TPGroupArg,
    VocabShard,
    all_reduce_,
    resolve_tp_group,
    vocab_shard,
)

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
"""Philox4x32's round multipliers."""
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
"""Philox4x32's key increments (the golden ratio and sqrt(3) - 1)."""
PHILOX_ROUNDS = 10

FIRST_TOP_P_CANDIDATES = 64
"""Candidates per TP rank in the first top-p round; enough for most rows of a trained model."""


def next_tokens(
    logits: Tensor,
    vocab_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    tp_group: TPGroupArg = FROM_PARALLEL_STATE,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The next token of each row and the entropy of the distribution it came from.

    ``temperature`` 0 is greedy. ``uniforms`` ([n] float64), when given, are the rows' own
    draws instead of ones from ``seed``. Returns ``(ids [n] long, entropy [n] float64)``.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    tp = resolve_tp_group(tp_group)
    shard = vocab_shard("logits", logits.shape[-1], vocab_size, tp)
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    entropy = softmax_entropy(scaled, shard, tp)
    if temperature == 0:
        return greedy_tokens(scaled, shard, tp), entropy
    if top_p < 1:
        scaled = top_p_filter(scaled, top_p, shard, tp)
    labels = torch.zeros(scaled.shape[0], dtype=torch.long, device=scaled.device)
    ids = sample_student_tokens(
        scaled,
        labels,
        vocab_size=vocab_size,
        tp_group=tp.group,
        sampling=SamplingOptions(seed=seed, uniforms=uniforms),
    )
    return ids, entropy


def greedy_tokens(logits: Tensor, shard: VocabShard, tp: TPGroup) -> Tensor:
    """The id of each row's largest real logit (the smallest such id on ties)."""
    n = logits.shape[0]
    if shard.real_width:
        best, column = logits[:, : shard.real_width].max(dim=-1)
        ids = column + shard.start
    else:
        best = logits.new_full((n,), -torch.inf)
        ids = torch.zeros(n, dtype=torch.long, device=logits.device)
    top = all_reduce_(best.clone(), dist.ReduceOp.MAX, tp)
    # Ranks without the maximum offer an id no real token has.
    offered = torch.where(best == top, ids, torch.iinfo(torch.long).max)
    return all_reduce_(offered, dist.ReduceOp.MIN, tp)


def softmax_entropy(logits: Tensor, shard: VocabShard, tp: TPGroup) -> Tensor:
    """Entropy (nats, float64) of the softmax over the real vocabulary, per row."""
    real = logits[:, : shard.real_width].double()
    local_max = (
        real.max(dim=-1).values if shard.real_width else real.new_full((real.shape[0],), -torch.inf)
    )
    top = all_reduce_(local_max, dist.ReduceOp.MAX, tp)
    exps = (real - top.unsqueeze(1)).exp()
    # sum exp(z - m) and sum exp(z - m) (z - m), reduced together: H = log S - E / S.
    sums = all_reduce_(
        torch.stack([exps.sum(dim=-1), (exps * (real - top.unsqueeze(1))).sum(dim=-1)]),
        dist.ReduceOp.SUM,
        tp,
    )
    return sums[0].log() - sums[1] / sums[0]


def top_p_filter(logits: Tensor, top_p: float, shard: VocabShard, tp: TPGroup) -> Tensor:
    """``logits`` (a new tensor) with the lowest float outside each row's top-p nucleus."""
    real = logits[:, : shard.real_width].double()
    n = real.shape[0]
    local_max = real.max(dim=-1).values if shard.real_width else real.new_full((n,), -torch.inf)
    top = all_reduce_(local_max, dist.ReduceOp.MAX, tp)
    log_total = (
        top + all_reduce_((real - top.unsqueeze(1)).exp().sum(dim=-1), dist.ReduceOp.SUM, tp).log()
    )
    k = FIRST_TOP_P_CANDIDATES
    while True:
        # Each rank sends its k best logits and its floor: the k-th best when it holds more
        # (nothing it kept back is above it), else -inf. Sorted, the candidates above every
        # floor are exactly the global best ones, so their running probability is exact
        # there; the nucleus is known once it crosses top_p above the floors.
        width = min(k, shard.width)
        mine = real.new_full((n, width + 1), -torch.inf)
        taken = min(width, shard.real_width)
        mine[:, :taken] = real.topk(taken, dim=-1).values
        if shard.real_width > width:
            mine[:, width] = mine[:, width - 1]
        gathered = _gather_columns(mine, tp).view(n, tp.size, width + 1)
        floor = gathered[:, :, width].amax(dim=-1, keepdim=True)
        candidates = gathered[:, :, :width].reshape(n, -1).sort(dim=-1, descending=True).values
        reached = (candidates - log_total.unsqueeze(1)).exp().cumsum(dim=-1) >= top_p
        known = (reached & (candidates > floor)).any(dim=-1)
        # Identical on every rank (gathered data), so all ranks leave the loop together.
        if bool(known.all()) or width == shard.width:
            break
        k *= 2
    # The first candidate that reaches top_p; a row that never does (rounding) keeps all.
    last_finite = (candidates > -torch.inf).sum(dim=-1) - 1
    cut = torch.where(reached.any(dim=-1), reached.int().argmax(dim=-1), last_finite)
    threshold = candidates.gather(1, cut.unsqueeze(1))
    filtered = logits.clone()
    filtered[:, : shard.real_width].masked_fill_(real < threshold, torch.finfo(logits.dtype).min)
    return filtered


def _gather_columns(block: Tensor, tp: TPGroup) -> Tensor:
    """Every TP rank's ``[n, w]`` block side by side: ``[n, w x TP]`` on all ranks."""
    if not tp.active:
        return block
    blocks = [torch.empty_like(block) for _ in range(tp.size)]
    dist.all_gather(blocks, block.contiguous(), group=tp.group)
    return torch.cat(blocks, dim=-1)


def seed_keys(seeds: list[int], device: torch.device) -> Tensor:
    """Each seed (mod 2^64) as a Philox key: ``[n, 2]`` int64 words below 2^32."""
    words = [[seed & MASK32, (seed >> 32) & MASK32] for seed in seeds]
    return torch.tensor(words, dtype=torch.long).reshape(-1, 2).to(device)


def counter_uniforms(keys: Tensor, counters: Tensor) -> Tensor:
    """U[0, 1) (float64, 53 random bits) for every key row and counter: ``[n, m]``.

    ``keys`` [n, 2] (``seed_keys``), ``counters`` [m] int64 >= 0. Entry (r, t) is a function
    of (key r, counter t) alone: the first two words of Philox4x32-10 at counter (t mod
    2^32, t >> 32, 0, 0) make 53 bits as numpy's and torch's doubles do ((a >> 5) x 2^26 +
    (b >> 6)) / 2^53.
    """
    n, m = keys.shape[0], counters.shape[0]
    k0 = keys[:, 0:1].expand(n, m)
    k1 = keys[:, 1:2].expand(n, m)
    c0 = (counters & MASK32).expand(n, m)
    c1 = (counters >> 32).expand(n, m)
    c2 = c3 = torch.zeros_like(c0)
    for round_ in range(PHILOX_ROUNDS):
        if round_:
            k0 = (k0 + PHILOX_W[0]) & MASK32
            k1 = (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    bits = (c0 >> 5) * 2**26 + (c1 >> 6)
    return bits.double() * 2.0**-53


def _mulhilo32(x: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of ``x`` x ``multiplier`` (both below 2^32), in int64 without
    overflow: the multiplier's 16-bit halves keep every partial product below 2^49 (signed
    int64 overflow is undefined in C++, and >> on int64 is arithmetic)."""
    high_half = x * (multiplier >> 16)  # < 2^48
    low_half = x * (multiplier & 0xFFFF)  # < 2^48
    # x * m = high_half * 2^16 + low_half = (high_half >> 16) * 2^32 + middle
    middle = ((high_half & 0xFFFF) << 16) + low_half  # < 2^49
    return (high_half >> 16) + (middle >> 32), middle & MASK32
