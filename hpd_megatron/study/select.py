"""The protocol's statistics: the learning rate chosen on validation, the seeds aggregated.

Pure functions of numbers (tests/test_study_protocol.py checks them by hand): the choice
reads validation accuracy only, so the test problems never take part in it.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

BOOTSTRAP_SAMPLES = 2000


def choose_lr(validation: Mapping[float, float]) -> float:
    """The learning rate with the best validation accuracy; a tie goes to the smaller rate
    (the one less likely to be at the edge of divergence)."""
    return min(validation, key=lambda lr: (-validation[lr], lr))


def spread(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and a 95 % percentile bootstrap
    interval of the mean over ``values``."""
    values = list(values)
    rng = random.Random(seed)
    means = sorted(
        statistics.fmean(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_SAMPLES)
    )
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "low": means[int(0.025 * BOOTSTRAP_SAMPLES)],
        "high": means[int(0.975 * BOOTSTRAP_SAMPLES) - 1],
        "n": len(values),
    }


def run_statistics(history: Sequence[Mapping[str, float]], clip_grad: float) -> dict[str, Any]:
    """One run's cost and gradient numbers from its per-step metrics: the median step time,
    the share of steps whose gradient norm exceeded ``clip_grad`` (clipped), the median
    gradient norm, and the means of the rollout share and HPD's A and B where logged."""
    norms = [row["grad_norm"] for row in history]
    numbers: dict[str, Any] = {
        "steps": len(history),
        "step_time_s": statistics.median(row["step_time_s"] for row in history),
        "clipped": sum(norm > clip_grad for norm in norms) / len(norms) if clip_grad > 0 else 0.0,
        "grad_norm_median": statistics.median(norms),
    }
    for key in ("rollout/share", "hpd/a_mean", "hpd/b_mean", "time/rollout_s"):
        logged = [row[key] for row in history if key in row]
        if logged:
            numbers[key] = statistics.fmean(logged)
    return numbers


def summarize_seeds(seeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Across a method's seeds: test accuracy, sampling entropy, greedy accuracy (where
    measured) and KL to the teacher (last checkpoint) with their spread; step time,
    clipped share and median gradient norm (medians and means of the runs'), and the
    rollout share where there is one."""
    summary: dict[str, Any] = {
        "accuracy": spread([s["test"]["accuracy"] for s in seeds]),
        "token_entropy": spread([s["test"]["token_entropy"] for s in seeds]),
        "step_time_s": statistics.median(s["step_time_s"] for s in seeds),
        "clipped": statistics.fmean(s["clipped"] for s in seeds),
        "grad_norm_median": statistics.median(s["grad_norm_median"] for s in seeds),
    }
    if all("test_greedy" in s for s in seeds):
        summary["greedy_accuracy"] = spread([s["test_greedy"]["accuracy"] for s in seeds])
    if all("kl_curve" in s for s in seeds):
        summary["kl_to_teacher"] = spread([s["kl_curve"][-1]["kl_to_teacher"] for s in seeds])
    if all("rollout/share" in s for s in seeds):
        summary["rollout_share"] = statistics.fmean(s["rollout/share"] for s in seeds)
    return summary
