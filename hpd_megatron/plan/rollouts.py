"""The rollouts of a step: the student's generation before the training forward.

Rollouts (rollout.fraction = lambda > 0) add their time to the step: step = training +
rollout. Before the training forward the student answers floor(lambda x global_batch_size)
rows per step, spread over the batch's positions as the trainer picks them
(hpd_megatron/training/rollout.py, setting.rollout_rows); the busiest DP rank's rows set the
step. It generates as hpd_megatron/eval/generate.py does: all of a rank's rows in one batch
with Megatron-Core's static KV cache, one micro-batch through the pipeline, so its stages take
turns (a forward costs the whole model's time per TP rank, not 1/PP of it). The prompt
length is not known before the data is read: it is estimated as P = data.seq_length -
max_new_tokens, and every reply as max_new_tokens = n long (no early EOS).
  FLOPs per row, forward only: the prefill, P x the forward FLOPs per token at s = P less
  the output layer on all but the last position (the static cache materialises only the
  last position's logits); then n - 1 one-token forwards, the one at context c (P < c < P +
  n) at 2 x matmul parameters + 4*c*nq*d*L (the n-th token is sampled, never fed).
  time per forward (roofline): max(FLOPs / (TP x --tflops), bytes / --hbm-gb-s), bytes =
  the student's matmul weights on one TP rank of every stage (each stage reads its own once)
  + for a decode forward the KV cache up to context c. Decoding is memory-bound: HBM_GB_S
  (H100 SXM) is the nominal peak, and kernel launches and the per-layer TP all-reduces'
  latency are not counted, so the decode time is a lower bound (the full-length replies
  make it an upper bound on the tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hpd_megatron.models.description import ModelDescription
from hpd_megatron.plan.counts import ParameterCount, matmul_flops_per_token, matmul_parameters
from hpd_megatron.plan.memory import kv_cache_bytes
from hpd_megatron.plan.setting import Setting

HBM_GB_S = 3350.0
"""GPU memory bandwidth, GB/s: H100 SXM5's HBM3, 3.35 TB/s (NVIDIA's H100 datasheet). A
nominal peak: decode times from it are lower bounds."""


@dataclass
class RolloutCost:
    """The rollouts of one step (module doc). FLOPs over all DP ranks; seconds on the slowest
    rank, which generates ``rows_per_dp_rank`` rows."""

    rows: int
    rows_per_dp_rank: int
    prompt_tokens: int
    """Estimated: data.seq_length - rollout.max_new_tokens."""
    new_tokens: int
    prefill_flops: float
    decode_flops: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def flops(self) -> float:
        return self.prefill_flops + self.decode_flops

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


def prefill_flops(model: ModelDescription, count: ParameterCount, prompt: int) -> int:
    """Forward FLOPs of one row's ``prompt`` tokens with the static KV cache: the output layer
    runs on the last position only (Megatron-Core's StaticInferenceContext materialises only
    the last token's logits)."""
    output = count.output_layer or count.embedding
    return prompt * matmul_flops_per_token(model, count, prompt) - (prompt - 1) * 2 * output


def rollout_cost(setting: Setting, tflops: float, hbm_gb_s: float) -> RolloutCost | None:
    """The step's rollouts (module doc); None without them."""
    run, student, count = setting.run, setting.student, setting.student_count
    if not run.rollout.enabled:
        return None
    tp = setting.layout.tensor_model_parallel_size
    rows, new = setting.rollout_rows_per_dp_rank, run.rollout.max_new_tokens
    prompt = run.data.seq_length - new
    # One micro-batch: the stages take turns, so a forward costs the whole model per TP rank.
    flops_per_second, bytes_per_second = tp * tflops * 1e12, hbm_gb_s * 1e9
    weights = setting.element_bytes * matmul_parameters(student, count) / tp

    def roofline(flops: float, cache: float = 0.0) -> float:
        return max(flops / flops_per_second, (weights + cache) / bytes_per_second)

    prefill = prefill_flops(student, count, prompt)
    decode, decode_seconds = decode_cost(setting, prompt, roofline)
    return RolloutCost(
        rows=sum(setting.rollout_rows),
        rows_per_dp_rank=rows,
        prompt_tokens=prompt,
        new_tokens=new,
        prefill_flops=float(sum(setting.rollout_rows) * prefill),
        decode_flops=float(sum(setting.rollout_rows) * decode),
        prefill_seconds=roofline(rows * prefill) if rows else 0.0,
        decode_seconds=decode_seconds if rows else 0.0,
    )


def decode_cost(
    setting: Setting, prompt: int, roofline: Callable[[float, float], float]
) -> tuple[float, float]:
    """FLOPs per row of the one-token forwards after a ``prompt``-token prefill, and their
    seconds on the busiest DP rank (``roofline``: seconds of a forward's FLOPs and KV cache
    bytes)."""
    student, count, tp = (
        setting.student,
        setting.student_count,
        setting.layout.tensor_model_parallel_size,
    )
    rows, new = setting.rollout_rows_per_dp_rank, setting.run.rollout.max_new_tokens
    seconds, flops_per_row = 0.0, 0
    for context in range(prompt + 1, prompt + new):  # the n-th token is never fed back
        flops = matmul_flops_per_token(student, count, context)
        cache = kv_cache_bytes(
            student, student.num_layers, tp, setting.element_bytes, rows, context
        )
        seconds += roofline(rows * flops, cache)
        flops_per_row += flops
    return flops_per_row, seconds
