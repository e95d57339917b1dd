"""The step's seconds, by cause.

With m micro-batches per data-parallel rank and per-micro-batch times on one stage (the
stages are balanced: layers split evenly):
  step = m*(c + tp + p2p) + (PP-1)*(c + tp + p2p) + dp
  (the second term is the 1F1B bubble; nothing is assumed to overlap, as by default)
  c    compute, b*s*FLOPs per token / (TP*PP*--tflops). m*c alone is the lower bound
       printed as "compute"; each term below only adds to it.
  tp   tensor parallelism: see communication.tensor_parallel_seconds (all-reduces, or with
       SP the all-gather + reduce-scatter pairs of the same volume)
  p2p  pipeline: see communication.pipeline_p2p_seconds
  dp   gradient reduce-scatter + parameter all-gather (distributed optimizer) or gradient
       all-reduce, once per step: see communication.data_parallel_seconds
Rollouts, when the recipe has them, add their own time (rollouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpd_megatron.plan.communication import (
    Interconnect,
    data_parallel_seconds,
    pipeline_p2p_seconds,
    tensor_parallel_seconds,
)
from hpd_megatron.plan.setting import Setting


@dataclass
class StepTime:
    """Seconds per step, by cause (formulas in the module doc). Estimates, not measurements."""

    compute: float
    """FLOPs at --tflops alone, no bubble, no communication: a lower bound."""
    tensor_parallel: float
    pipeline_p2p: float
    bubble: float
    data_parallel: float
    rollout: float = 0.0
    """The student's generation before the training forward (RolloutCost.seconds)."""

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.tensor_parallel
            + self.pipeline_p2p
            + self.bubble
            + self.data_parallel
            + self.rollout
        )


def step_time(
    setting: Setting, flops_per_token: float, gpus_per_node: int, tflops: float, links: Interconnect
) -> StepTime:
    """The step's estimate (module doc): per-micro-batch stage times, m of them plus the
    PP - 1 of the 1F1B bubble, and the data-parallel exchange once."""
    layout, run = setting.layout, setting.run
    tp, pp, dp = (
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.data_parallel_size,
    )
    tokens = run.schedule.micro_batch_size * run.data.seq_length
    compute = tokens * flops_per_token / (tp * pp * tflops * 1e12)
    tp_comm = tensor_parallel_seconds(setting, links.bytes_per_second(tp, gpus_per_node))
    p2p = pipeline_p2p_seconds(setting, links.bytes_per_second(tp * dp * pp, gpus_per_node))
    m = setting.micro_batches
    return StepTime(
        compute=m * compute,
        tensor_parallel=m * tp_comm,
        pipeline_p2p=m * p2p,
        bubble=(pp - 1) * (compute + tp_comm + p2p),
        data_parallel=data_parallel_seconds(
            setting, links.bytes_per_second(tp * dp, gpus_per_node)
        ),
    )
