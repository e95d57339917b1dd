"""Which records share a training sample when ``data.pack`` is on.

Best-fit decreasing within shuffled windows: the records are permuted with the run's seed,
cut into windows of ``PACK_WINDOW`` records, and inside each window the longest record
goes first into the sample with the least room that still holds it (a new sample when none
does). Shuffling first keeps every window a fair draw of the length distribution, so long
and short records mix in every part of the data; the window bounds the work and keeps
samples from being made only of the shortest leftovers.

The result depends on the records' sizes, the capacity and the seed only: not on the DP
size, nor on anything a resume changes, so the sampler's exact-resume guarantee holds.
"""

from __future__ import annotations

import bisect

import numpy

PACK_WINDOW = 4096
"""Records per best-fit window: large enough that the efficiency is within a fraction of a
percent of packing everything at once (docs/data.md)."""


def best_fit_decreasing(
    sizes: numpy.ndarray, capacity: int, seed: int, window: int = PACK_WINDOW
) -> list[list[int]]:
    """Record ids per sample; every sample's sizes sum to at most ``capacity``.

    ``sizes[r]`` is the number of positions record r fills (its tokens minus one).
    """
    order = numpy.random.default_rng(seed).permutation(len(sizes))
    samples: list[list[int]] = []
    for start in range(0, len(order), window):
        samples += _best_fit(order[start : start + window], sizes, capacity)
    return samples


def _best_fit(records: numpy.ndarray, sizes: numpy.ndarray, capacity: int) -> list[list[int]]:
    # Ties broken by record id: the order, hence the samples, depend on the data only.
    ranked = sorted(records.tolist(), key=lambda record: (-int(sizes[record]), record))
    samples: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, sample number), ascending
    for record in ranked:
        size = int(sizes[record])
        slot = bisect.bisect_left(rooms, (size, -1))  # the tightest sample that fits
        if slot == len(rooms):
            samples.append([record])
            room, number = capacity - size, len(samples) - 1
        else:
            room, number = rooms.pop(slot)
            samples[number].append(record)
            room -= size
        if room > 0:
            bisect.insort(rooms, (room, number))
    return samples


def next_fit(sizes: numpy.ndarray, capacity: int) -> list[list[int]]:
    """Consecutive records while they fit: the packing before best-fit, kept as the
    baseline that docs/data.md, the tests and bench/packing_bench.py compare against."""
    samples: list[list[int]] = [[]]
    used = 0
    for record, size in enumerate(sizes.tolist()):
        if used + size > capacity and samples[-1]:
            samples.append([])
            used = 0
        samples[-1].append(record)
        used += size
    return samples


def efficiency(sizes: numpy.ndarray, num_samples: int, capacity: int) -> float:
    """Real positions over slots: the share of the computed positions that hold a record."""
    return float(numpy.sum(sizes)) / (num_samples * capacity) if num_samples else 0.0


def packing_report(sizes: numpy.ndarray, capacity: int, seed: int = 0) -> dict[str, float | int]:
    """Samples and efficiency packed and padded, for the data sidecar and the start-up line."""
    packed = len(best_fit_decreasing(sizes, capacity, seed))
    return {
        "seq_length": capacity,
        "packed_samples": packed,
        "packed_efficiency": round(efficiency(sizes, packed, capacity), 4),
        "padded_samples": len(sizes),
        "padded_efficiency": round(efficiency(sizes, len(sizes), capacity), 4),
    }
