"""The TP x PP x DP (x CP) grid of a run, and every divisibility rule it must obey.

Validation runs before any process group or model exists, and reports all problems at
once with the values involved, so a bad sbatch line fails in seconds, not after the
teacher has been loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hpd_megatron.errors import ConfigError
from hpd_megatron.models.description import ModelDescription


class LayoutError(ConfigError):
    """The parallel layout does not fit the world size or a model."""


@dataclass
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: int | None = None
    """None: whatever the world size leaves after TP x PP x CP."""

    def __post_init__(self) -> None:
        if self.context_parallel_size != 1:
            raise LayoutError(
                f"parallel.context_parallel_size: {self.context_parallel_size} is not supported "
                "yet (batches are not split per CP rank and the loss is not CP-aware); use 1"
            )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def describe(self) -> str:
        dp = "?" if self.data_parallel_size is None else self.data_parallel_size
        return (
            f"TP={self.tensor_model_parallel_size} PP={self.pipeline_model_parallel_size} "
            f"CP={self.context_parallel_size} DP={dp}"
        )


def _model_problems(name: str, model: ModelDescription, tp: int, pp: int) -> list[str]:
    """What stops ``model`` from being split TP ways per layer and into PP stages."""
    problems = []
    for key, size in (
        ("num_attention_heads", model.num_attention_heads),
        ("num_query_groups (KV heads)", model.num_query_groups),
        ("ffn_hidden_size", model.ffn_hidden_size),
    ):
        if size % tp:
            problems.append(f"{name}: TP={tp} does not divide {key}={size}")
    if model.num_layers % pp:
        problems.append(f"{name}: PP={pp} does not divide num_layers={model.num_layers}")
    return problems


def validate_layout(
    layout: ParallelLayout,
    world_size: int,
    models: Iterable[tuple[str, ModelDescription]] = (),
) -> ParallelLayout:
    """Check ``layout`` against the world size and each (name, model); return it with DP set.

    Raises one LayoutError listing every violated rule.
    """
    tp = layout.tensor_model_parallel_size
    pp = layout.pipeline_model_parallel_size
    cp = layout.context_parallel_size
    problems = []
    for name, size in (
        ("tensor_model_parallel_size", tp),
        ("pipeline_model_parallel_size", pp),
        ("context_parallel_size", cp),
    ):
        if size < 1:
            problems.append(f"{name} must be >= 1, got {size}")
    if problems:
        raise LayoutError("invalid parallel layout: " + "; ".join(problems))

    model_parallel = tp * pp * cp
    dp = layout.data_parallel_size
    if dp is None:
        if world_size % model_parallel:
            problems.append(
                f"world size {world_size} is not a multiple of TP x PP x CP = "
                f"{tp} x {pp} x {cp} = {model_parallel}"
            )
        dp = max(world_size // model_parallel, 1)
    elif tp * pp * cp * dp != world_size:
        problems.append(
            f"world size {world_size} != TP x PP x CP x DP = {tp} x {pp} x {cp} x {dp} = "
            f"{model_parallel * dp}"
        )

    for name, model in models:
        problems += _model_problems(name, model, tp, pp)
    if problems:
        raise LayoutError("invalid parallel layout: " + "; ".join(problems))
    return ParallelLayout(tp, pp, cp, dp)
