"""The recipe's ``performance:`` section on this node: what each model's configs receive.

A setting reaches Megatron-Core through each model's TransformerConfig and the student's
DistributedDataParallelConfig (and, through it, its OptimizerConfig). The fused kernels at
hand decide the rest: a fusion the node lacks is switched off, as upstream Megatron-LM does
when a kernel is missing, and a setting that cannot run here is refused with its key.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch

from hpd_megatron.errors import ConfigError
from hpd_megatron.models.builder import transformer_engine_import
from hpd_megatron.models.dtypes import DTYPES
from hpd_megatron.training.config import PerformanceConfig, RunConfig


@dataclass(frozen=True)
class Kernels:
    """What this process can run besides plain torch."""

    cuda: bool
    apex_weight_gradient: bool
    """apex's fused_weight_gradient_mlp_cuda, which Megatron's gradient-accumulation fusion
    needs in every ColumnParallelLinear (the output layer is one, also with the TE spec)."""
    te_version: str | None = None
    """Transformer Engine's version when it imports (with CUDA); None: it cannot be used."""
    te_problem: str | None = None
    """Why Transformer Engine is unusable ("not installed", or the import's error)."""

    @property
    def transformer_engine(self) -> bool:
        return self.te_version is not None

    @classmethod
    def detect(cls) -> Kernels:
        cuda = torch.cuda.is_available()
        version, problem = transformer_engine_import() if cuda else (None, "no CUDA")
        return cls(
            cuda=cuda,
            apex_weight_gradient=cuda
            and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
            te_version=version,
            te_problem=problem,
        )


@dataclass(frozen=True)
class ModelSettings:
    """Everything a model's build needs from the performance section."""

    use_transformer_engine: bool
    params_dtype: torch.dtype
    overrides: dict[str, Any]
    """TransformerConfig fields."""


@dataclass(frozen=True)
class Performance:
    """The section resolved for one run on this node."""

    student: ModelSettings
    teacher: ModelSettings
    ddp: dict[str, Any]
    """DistributedDataParallelConfig fields (build_optimizer copies overlap_param_gather)."""
    transformer_engine_version: str | None = None
    """The TE both models use (None: the local spec)."""


FP8_ALIGNMENT = 16
SUPPORTED_TE = ((2, 9), (2, 12))
"""Transformer Engine versions megatron-core 0.16.1 is developed against: >=2.9,<2.12
(requirements-gpu.txt)."""


def _te_version_supported(version: str) -> bool:
    numbers = re.match(r"(\d+)\.(\d+)", version)
    if numbers is None:
        return False
    release = (int(numbers[1]), int(numbers[2]))
    return SUPPORTED_TE[0] <= release < SUPPORTED_TE[1]


def use_transformer_engine(settings: PerformanceConfig, kernels: Kernels) -> bool:
    """The TE spec on CUDA unless the recipe asks for the local one; never on the CPU."""
    if not kernels.cuda or settings.transformer_impl == "local":
        return False
    fallback = (
        "performance.transformer_impl=local runs Megatron's unfused spec, which runs out of "
        "memory at long sequences"
    )
    if not kernels.transformer_engine:
        raise ConfigError(
            f"performance.transformer_impl: transformer_engine, but Transformer Engine is "
            f"{kernels.te_problem} (pip install -r requirements-gpu.txt, or the NGC PyTorch "
            f"container); {fallback}"
        )
    if not _te_version_supported(kernels.te_version):
        low, high = SUPPORTED_TE
        raise ConfigError(
            f"performance.transformer_impl: Transformer Engine {kernels.te_version} is outside "
            f"the supported range >={low[0]}.{low[1]},<{high[0]}.{high[1]} (megatron-core "
            f"0.16.1; requirements-gpu.txt installs a supported one); {fallback}"
        )
    return True


def transformer_engine_problems(run: RunConfig, tensor_parallel_size: int, sp: bool) -> list[str]:
    """What the TE spec would reject in its first forward, found before anything is built."""
    problems = []
    if run.data.pack and run.schedule.micro_batch_size > 1:
        # Packed samples run as THD (one flat token stream per micro-batch), which TE's
        # attention and Megatron's packed_seq_params take one sample at a time.
        problems.append(
            f"schedule.micro_batch_size: {run.schedule.micro_batch_size} with data.pack; "
            "packed samples run one per micro-batch with Transformer Engine (set it to 1 "
            "and raise global_batch_size's accumulation instead)"
        )
    if run.performance.teacher_precision == "fp8":
        problems += _fp8_gemm_problems(run, tensor_parallel_size, sp)
    return problems


def _fp8_gemm_problems(run: RunConfig, tensor_parallel_size: int, sp: bool) -> list[str]:
    """TE's FP8 GEMMs need each input's rows (tokens) and width divisible by 16
    (``assert_dim_for_fp8_exec``); with sequence parallelism a rank casts 1/TP of the tokens."""
    tokens = run.schedule.micro_batch_size * run.data.seq_length
    local = tokens // tensor_parallel_size if sp else tokens
    if local % FP8_ALIGNMENT == 0:
        return []
    where = f" / TP {tensor_parallel_size} (sequence parallel)" if sp else ""
    return [
        f"performance.teacher_precision: fp8 needs the tokens per GEMM divisible by "
        f"{FP8_ALIGNMENT}; micro_batch_size x seq_length = {tokens}{where} = {local} is not "
        f"(choose data.seq_length a multiple of {FP8_ALIGNMENT * tensor_parallel_size})"
    ]


def sequence_parallel(settings: PerformanceConfig, tensor_parallel_size: int, te: bool) -> bool:
    """On by default whenever TP > 1 with TE; Megatron's torch norms cannot split it."""
    if tensor_parallel_size == 1:
        return False  # Megatron-LM's validate_args turns it off at TP 1 as well.
    if settings.sequence_parallel is None:
        return te
    if settings.sequence_parallel and not te:
        raise ConfigError(
            "performance.sequence_parallel: needs the Transformer Engine spec on CUDA "
            "(Megatron's local spec uses torch norms, which refuse it)"
        )
    return settings.sequence_parallel


def teacher_dtype(run: RunConfig, kernels: Kernels) -> torch.dtype:
    """A frozen teacher needs no fp32 master weights: bf16 on GPUs halves its memory."""
    precision = run.performance.teacher_precision
    if precision == "auto":
        return torch.bfloat16 if kernels.cuda else DTYPES[run.params_dtype]
    return torch.float32 if precision == "fp32" else torch.bfloat16


def _teacher_fp8(settings: PerformanceConfig, te: bool) -> dict[str, Any]:
    if settings.teacher_precision != "fp8":
        return {}
    if not te:
        raise ConfigError(
            "performance.teacher_precision: fp8 needs Transformer Engine on CUDA "
            "(performance.transformer_impl=transformer_engine)"
        )
    # Forward only: E4M3 throughout (hybrid would use E5M2 for gradients it never has).
    return {"fp8": "e4m3", "fp8_recipe": settings.teacher_fp8_recipe}


def _recompute(settings: PerformanceConfig) -> dict[str, Any]:
    if settings.recompute_granularity is None:
        return {}
    if settings.recompute_granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": settings.recompute_method,
        "recompute_num_layers": settings.recompute_num_layers,
    }


def sequence_parallel_problems(run: RunConfig, tensor_parallel_size: int, sp: bool) -> list[str]:
    """What sequence parallelism cannot do in ``run`` (the trainer refuses the first, the
    planner lists them all)."""
    if not sp:
        return []
    problems = []
    if run.data.seq_length % tensor_parallel_size:
        problems.append(
            f"data.seq_length: {run.data.seq_length} is not a multiple of the TP size "
            f"{tensor_parallel_size}, which sequence parallelism needs "
            "(or set performance.sequence_parallel=false)"
        )
    if run.rollout.enabled:
        # Each decode step feeds one token per row, which TP ranks cannot split; the
        # training model's sequence parallelism would have to be switched off around
        # every rollout. Not done yet: say so instead of failing in the first decode.
        problems.append(
            "rollout.fraction: rollouts decode one token at a time, which sequence "
            "parallelism cannot split over the TP ranks; set performance.sequence_parallel=false"
        )
    return problems


def resolve_performance(
    run: RunConfig, tensor_parallel_size: int, kernels: Kernels | None = None
) -> Performance:
    """The section's effect on every config, or a ConfigError naming the key at fault."""
    settings = run.performance
    kernels = Kernels.detect() if kernels is None else kernels
    te = use_transformer_engine(settings, kernels)
    sp = sequence_parallel(settings, tensor_parallel_size, te)
    problems = sequence_parallel_problems(run, tensor_parallel_size, sp)
    problems += transformer_engine_problems(run, tensor_parallel_size, sp) if te else []
    if problems:
        raise ConfigError(problems[0])
    shared = {
        "sequence_parallel": sp,
        "apply_rope_fusion": settings.apply_rope_fusion and te,
    }
    student = {
        **shared,
        **_recompute(settings),
        "gradient_accumulation_fusion": (
            settings.gradient_accumulation_fusion and kernels.apex_weight_gradient
        ),
        "deallocate_pipeline_outputs": settings.deallocate_pipeline_outputs,
    }
    teacher = {**shared, **_teacher_fp8(settings, te)}
    return Performance(
        student=ModelSettings(te, DTYPES[run.params_dtype], student),
        teacher=ModelSettings(te, teacher_dtype(run, kernels), teacher),
        ddp={
            "overlap_grad_reduce": settings.overlap_grad_reduce,
            "overlap_param_gather": settings.overlap_param_gather,
        },
        transformer_engine_version=kernels.te_version if te else None,
    )
