"""Exact vocab-parallel sampling of one token per position from the student's softmax.

Two samplers, both exact for the fp32 distribution, both identical on every TP rank:

``inverse_cdf`` (default)
    One uniform u per position (drawn from the seed, then broadcast from TP rank 0 so a
    mis-seeded rank cannot disagree). The log-sum-exp pass already produces each rank's
    mass ``sum exp(z - max)``; the ranks' masses, gathered as a [TP, tokens] vector, pick
    the owning rank, which then searches u's remainder in the running sum of its own
    shard. No per-entry noise is drawn, and since vocabulary order is rank order the
    sample is the same at every TP size (up to floating-point rounding at bucket edges).
``gumbel``
    argmax(z + Gumbel noise): each rank takes the argmax over its shard, an all-reduce
    MAX keeps the best score and an all-reduce MIN of the winners' ids resolves exact
    ties. Needs one random number and two logs per vocabulary entry, so it is slower
    on most hardware; the noise depends on the TP layout and chunking, so samples are
    reproducible for a fixed layout only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from hpd_megatron.losses.vocab_parallel import TPGroup, VocabShard, broadcast_from_first_

Sampler = Literal["inverse_cdf", "gumbel"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)


# eq=False: a generated __eq__ would compare tensors, which has no single truth value.
@dataclass(frozen=True, eq=False)
class SamplingOptions:
    """Where HPD's sample yh comes from; methods that use no sample ignore it.

    Everything must be the same on all TP ranks (the inverse-CDF sampler's own uniforms
    are made so anyway, by a broadcast from TP rank 0).
    """

    sampler: Sampler = "inverse_cdf"
    sampled_tokens: Tensor | None = None
    """yh per position, shaped like the labels, used instead of drawing."""
    uniforms: Tensor | None = None
    """The inverse-CDF sampler's U[0, 1) per position, shaped like the labels (e.g. drawn
    per sequence), instead of drawing them; the Gumbel sampler ignores them."""
    generator: torch.Generator | None = None
    seed: int | None = None
    """The draw's randomness: the seed wins over the generator; neither: torch's default."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")


def draw_uniforms(
    num_positions: int,
    device: torch.device,
    tp: TPGroup,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """float64 U[0, 1) per position, identical on all TP ranks."""
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    gen_device = generator.device if generator is not None else device
    u = torch.rand(num_positions, dtype=torch.float64, device=gen_device, generator=generator)
    return broadcast_from_first_(u.to(device), tp)


def base_seed(generator: torch.Generator | None, seed: int | None) -> int:
    """An integer seed for the per-chunk Gumbel generators."""
    if seed is not None:
        return int(seed)
    drawn = torch.randint(
        0,
        2**62,
        (1,),
        generator=generator,
        device=generator.device if generator is not None else "cpu",
    )
    return int(drawn.item())


def chunk_generator(seed: int, chunk: int, tp_rank: int, device: torch.device) -> torch.Generator:
    """Independent noise per (chunk, rank): each rank draws for its own vocabulary slice."""
    mixed = hash((int(seed), chunk, tp_rank)) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def gumbel_scores(
    logits: Tensor, work: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Best local score max_j (z_j + G_j) and its local column; ``work`` is overwritten."""
    if logits.shape[-1] == 0:
        n = logits.shape[0]
        return (
            torch.full((n,), -torch.inf, dtype=logits.dtype, device=logits.device),
            torch.zeros(n, dtype=torch.long, device=logits.device),
        )
    # z + G with G = -log(-log U): work <- log(-log U), then z - work.
    work.uniform_(generator=generator).log_().neg_().log_()
    work.neg_().add_(logits)
    best, column = work.max(dim=-1)
    return best, column


def running_mass_(exps: Tensor) -> Tensor:
    """Turn exp(z - local max) into its running sum in place; return the row totals."""
    if exps.shape[-1] == 0:
        return exps.new_zeros(exps.shape[0])
    exps.cumsum_(dim=-1)
    return exps[:, -1].clone()


def inverse_cdf_pick(
    masses: Tensor, u: Tensor, running: Tensor, local_scale: Tensor, shard: VocabShard, tp: TPGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose the owning rank from all ranks' masses, then the column inside its shard.

    masses: [TP, n] float64, each rank's ``sum exp(z - global max)`` (identical on all ranks);
    running: [n, local real width] running sums of ``exp(z - local max)`` on this rank;
    local_scale: [n] float64, ``exp(local max - global max)``.
    Returns (owned [n] bool, global id [n] long (valid where owned), local column [n]).
    """
    total_by_rank = masses.cumsum(dim=0)
    target = u * total_by_rank[-1]
    owner = (total_by_rank <= target).sum(dim=0)
    # Rounding can put the target at or past the total: fall back to the last rank with mass.
    ranks = torch.arange(masses.shape[0], device=masses.device).unsqueeze(1)
    last_with_mass = torch.where(masses > 0, ranks, 0).amax(dim=0)
    owner = torch.minimum(owner, last_with_mass)
    owned = owner == tp.rank
    n = masses.shape[1]
    if shard.real_width == 0:
        zeros = torch.zeros(n, dtype=torch.long, device=masses.device)
        return owned & False, zeros, zeros
    below = total_by_rank[tp.rank] - masses[tp.rank]
    # Only the owner's remainder is meaningful (elsewhere local_scale may be 0).
    remainder = torch.where(owned, (target - below) / local_scale.clamp_min(1e-300), 0.0)
    local_target = remainder.to(running.dtype)
    # Strictly below the row total and >= 0, so the first running sum above it has mass.
    row_total = running[:, -1]
    local_target = torch.minimum(
        local_target.clamp_min(0), torch.nextafter(row_total, torch.zeros_like(row_total))
    )
    column = torch.searchsorted(running, local_target.unsqueeze(1), right=True).squeeze(1)
    column = column.clamp_max(shard.real_width - 1)
    return owned, shard.start + column, column
