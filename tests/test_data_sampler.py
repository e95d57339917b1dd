"""The data-parallel batch sampler: documented order, epochs, DP-size independence, resume."""

from __future__ import annotations

import itertools

import numpy
import pytest

from hpd_megatron.data.sampler import DistributedBatchSampler
from hpd_megatron.errors import ConfigError


def steps(sampler: DistributedBatchSampler, count: int) -> list[list[list[int]]]:
    return list(itertools.islice(iter(sampler), count))


def global_batches(
    num_samples, global_batch_size, micro_batch_size, dp_size, seed, count, consumed=0
):
    """Per step, the concatenation of every rank's micro-batches (rank order)."""
    per_rank = [
        steps(
            DistributedBatchSampler(
                num_samples,
                global_batch_size,
                micro_batch_size,
                rank,
                dp_size,
                seed,
                consumed_samples=consumed,
            ),
            count,
        )
        for rank in range(dp_size)
    ]
    return [
        [i for rank in per_rank for micro in rank[step] for i in micro] for step in range(count)
    ]


def test_order_is_the_seeded_permutation_stream():
    # 10 samples, global batch 4: steps cover epoch 0 [0:4], [4:8], then [8:10] + epoch 1 [0:2].
    epoch0 = numpy.random.default_rng(5).permutation(10).tolist()
    epoch1 = numpy.random.default_rng(6).permutation(10).tolist()
    assert epoch0 != epoch1  # epochs reshuffle
    sampler = DistributedBatchSampler(10, 4, 2, dp_rank=0, dp_size=1, seed=5)
    assert steps(sampler, 3) == [
        [epoch0[0:2], epoch0[2:4]],
        [epoch0[4:6], epoch0[6:8]],
        [epoch0[8:10], epoch1[0:2]],
    ]
    assert sampler.state_dict() == {
        "consumed_samples": 12,
        "epoch": 1,
        "seed": 5,
        "num_samples": 10,
    }


def test_every_epoch_visits_every_sample_once():
    flat = [i for batch in global_batches(12, 6, 1, 1, seed=0, count=6) for i in batch]
    epochs = [flat[0:12], flat[12:24], flat[24:36]]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_dp_size_does_not_change_global_batches():
    dp1 = global_batches(37, 8, 2, dp_size=1, seed=3, count=10)
    assert global_batches(37, 8, 2, dp_size=2, seed=3, count=10) == dp1
    assert global_batches(37, 8, 1, dp_size=4, seed=3, count=10) == dp1
    # Rank shares are contiguous and disjoint: rank 1 of DP=2 gets the second half.
    rank1 = steps(DistributedBatchSampler(37, 8, 2, dp_rank=1, dp_size=2, seed=3), 1)[0]
    assert rank1 == [dp1[0][4:6], dp1[0][6:8]]


def test_resume_continues_exactly():
    uninterrupted = steps(DistributedBatchSampler(23, 6, 3, 1, 2, seed=9), 12)
    first = DistributedBatchSampler(23, 6, 3, 1, 2, seed=9)
    head = steps(first, 5)
    state = first.state_dict()
    assert state == {"consumed_samples": 30, "epoch": 1, "seed": 9, "num_samples": 23}
    resumed = DistributedBatchSampler(23, 6, 3, 1, 2, seed=9)
    resumed.load_state_dict(state)
    assert head + steps(resumed, 7) == uninterrupted
    # ... and at another DP size the union of the ranks continues the same global batches.
    assert (
        global_batches(23, 6, 1, dp_size=3, seed=9, count=7, consumed=30)
        == global_batches(23, 6, 3, dp_size=1, seed=9, count=12)[5:]
    )


def test_sampler_rejects_bad_settings():
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size: 6 is not a multiple of micro_batch_size x DP = 2 x 2",
    ):
        DistributedBatchSampler(10, 6, 2, 0, 2, seed=0)
    with pytest.raises(ConfigError, match=r"dp_rank 2 is outside \[0, 2\)"):
        DistributedBatchSampler(10, 4, 1, 2, 2, seed=0)
    with pytest.raises(ConfigError, match=r"no samples"):
        DistributedBatchSampler(0, 4, 1, 0, 1, seed=0)
    sampler = DistributedBatchSampler(10, 4, 1, 0, 1, seed=0)
    with pytest.raises(ConfigError, match=r"written with seed=1, this run has seed=0"):
        sampler.load_state_dict({"consumed_samples": 4, "epoch": 0, "seed": 1, "num_samples": 10})
    with pytest.raises(
        ConfigError, match=r"written with num_samples=11, this run has num_samples=10"
    ):
        sampler.load_state_dict({"consumed_samples": 4, "epoch": 0, "seed": 0, "num_samples": 11})
