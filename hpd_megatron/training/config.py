"""RunConfig: a YAML recipe plus dotted command-line overrides, as typed dataclasses.

    run = load_run_config("recipes/tiny_cpu.yaml", ["loss.method=fkl", "schedule.train_steps=50"])

Every section is a dataclass; unknown keys and values of the wrong type are errors that
name the dotted key (``ConfigError``). Paths in the recipe are taken relative to the
working directory, as a user typing the command expects.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hpd_megatron.config import expand_variables, from_dict, load_yaml
from hpd_megatron.errors import ConfigError
from hpd_megatron.losses.methods import HpdB, MethodName, needs_teacher
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.device import Device
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.tracking.config import TrackingConfig


@dataclass
class ModelSource:
    """A model: its architecture (a description YAML or inline) and optional weights."""

    model: Any
    """Path to a ModelDescription YAML, or the description inline as a mapping."""
    checkpoint: str | None = None
    """The teacher's weights: a model-only distributed checkpoint (any TP/PP). The student
    starts from ``checkpoint.load`` instead."""

    def description(self, where: str) -> ModelDescription:
        if isinstance(self.model, str):
            return ModelDescription.from_yaml(self.model)
        return ModelDescription.from_dict(self.model, f"{where}.model")


@dataclass
class DataConfig:
    train: str = ""
    """Output prefix written by tools/prepare_data.py."""
    seq_length: int = 128
    pack: bool = False
    """Concatenate records into seq_length windows instead of padding each one."""

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ConfigError(f"data.seq_length: must be >= 2, got {self.seq_length}")


UNFUSED_CHUNK_TOKENS = 1024
"""``loss.chunk_size`` unset, on materialised logits: tokens per chunk of the loss kernel."""


@dataclass
class LossConfig:
    method: MethodName = "hpd"
    alpha: float = 0.1
    """Skew of skl / srkl."""
    beta: float = 0.5
    """Mixture weight of the generalised JSD."""
    hpd_b: HpdB = "reference"
    """HPD's sample term B: ``reference`` (the paper's, the default), ``drop`` (B = 0, A
    alone) or ``bound`` (B bounded below by ``hpd_b_floor``); docs/study.md says when."""
    hpd_b_floor: float = -1.0
    """The lower bound of B under ``hpd_b: bound`` (B is never positive)."""
    chunk_size: int | None = None
    """Tokens per chunk inside the loss kernel (bounds its temporaries); None: the path's
    default (1,024 tokens unfused; fused, 16 Mi elements of the vocabulary shard)."""
    fused_head: bool = False
    """Fuse both models' output layers into the loss: no [tokens, vocab/TP] logits are
    materialised (hpd_megatron/losses/fused_head.py, docs/losses.md)."""

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            _at_least_one("loss.chunk_size", self.chunk_size)
        if self.hpd_b_floor > 0:
            raise ConfigError(
                f"loss.hpd_b_floor: must be <= 0 (B is never positive), got {self.hpd_b_floor}"
            )


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    max_consecutive_nonfinite: int = 3
    """A step whose loss or gradients are not finite is skipped (and counted); this many in a
    row stop the run, leaving the last checkpoint as it was."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ConfigError(f"optimizer.lr: must be >= 0, got {self.lr}")
        _at_least_one("optimizer.max_consecutive_nonfinite", self.max_consecutive_nonfinite)


@dataclass
class ScheduleConfig:
    train_steps: int = 100
    warmup_steps: int = 10
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    global_batch_size: int = 8
    """Sequences per optimizer step, over all micro-batches and data-parallel ranks."""
    micro_batch_size: int = 1
    exit_interval: int = 0
    """Save and stop after a step divisible by this (0: run to train_steps), as Megatron's
    --exit-interval; the next launch resumes."""

    def __post_init__(self) -> None:
        for name in ("train_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.train_steps:
            # Megatron's scheduler asserts this deep inside; say it with the keys.
            raise ConfigError(
                f"schedule.warmup_steps: must be in [0, schedule.train_steps), got "
                f"{self.warmup_steps} with train_steps {self.train_steps}"
            )


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Training checkpoints (iter_XXXXXXX/ + tracker); None: <run_dir>/checkpoints. A run
    whose directory holds a complete checkpoint resumes from it."""
    save_interval: int = 0
    """Save every this many steps and at the end; 0: never."""
    keep_last: int = 2
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """On any of these, all ranks save at the next step boundary and exit with code 75."""
    load: str | None = None
    """The student's starting weights when the run has no checkpoint of its own yet: a
    converted or exported model-only checkpoint, or another run's training checkpoint
    (weights only, as Megatron's --finetune). None: random initialisation."""
    load_optimizer: bool = True
    """Resume the Adam moments too. False keeps weights, schedule and data position and
    restarts the moments (e.g. to switch optimizer.use_distributed_optimizer mid-run)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is saved (Megatron's sharding types):
    dp_reshardable (fully parallel; resumes at the same TP x PP, any DP) or
    fully_reshardable (gathered per TP x PP shard; resumes at any layout)."""
    export_dir: str | None = None
    """Where the trained student's model-only weights go at the end (any TP/PP can load
    them), with model.yaml and the hf/ files of checkpoint.load when it has them."""

    def __post_init__(self) -> None:
        # Zero or less would delete every save, the one just written included.
        _at_least_one("checkpoint.keep_last", self.keep_last)


@dataclass
class PerformanceConfig:
    """Megatron-Core's speed settings, with upstream Megatron-LM's defaults.

    Mapped onto both models' TransformerConfig where they must agree (the layer spec,
    sequence parallelism, RoPE fusion), onto the student's alone where only training uses
    them (recomputation, gradient-accumulation fusion), and onto the DDP and optimizer
    configs. A fused kernel that the node lacks is ignored (the CPU has none); a setting
    that cannot work is refused with its key (hpd_megatron/training/performance.py).
    """

    transformer_impl: Literal["transformer_engine", "local"] = "transformer_engine"
    """The layer spec on CUDA: Transformer Engine (required unless local is asked for), or
    Megatron-Core's local spec, whose unfused attention runs out of memory at 8k tokens.
    The CPU always runs the local spec."""
    sequence_parallel: bool | None = None
    """Split norms and dropout along the sequence over the TP group; null: on whenever
    TP > 1 with Transformer Engine (never at TP 1)."""
    apply_rope_fusion: bool = True
    """Transformer Engine's fused RoPE (ignored without it)."""
    gradient_accumulation_fusion: bool = True
    """Accumulate weight gradients into the fp32 main grads inside the GEMM (needs apex's
    fused_weight_gradient_mlp_cuda on CUDA; ignored without it)."""
    deallocate_pipeline_outputs: bool = True
    """Free each stage's sent activation, keeping only its autograd graph."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets during the backward pass."""
    overlap_param_gather: bool = False
    """Gather the distributed optimizer's updated parameters during the next forward
    (needs optimizer.use_distributed_optimizer and overlap_grad_reduce)."""
    recompute_granularity: Literal["selective", "full"] | None = None
    """Activation recomputation of the student: selective (core attention) or full layers."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With full recomputation: uniform groups of recompute_num_layers, or the first
    recompute_num_layers layers of each stage (block)."""
    recompute_num_layers: int = 1
    distributed_timeout_minutes: float = 10.0
    """How long a collective may wait before the job fails (torch.distributed timeout)."""
    fully_parallel_save: bool = True
    """Spread the writing of replicated tensors over the data-parallel ranks."""
    fully_parallel_load: bool = False
    """Read each tensor once per data-parallel group and exchange it."""
    teacher_precision: Literal["auto", "bf16", "fp32", "fp8"] = "auto"
    """The frozen teacher's compute: auto is bf16 on CUDA and params_dtype on the CPU; fp8
    runs its linear layers in FP8 through Transformer Engine (CUDA only)."""
    teacher_fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "tensorwise"
    """Transformer Engine's FP8 scaling recipe when teacher_precision is fp8 (mxfp8 needs
    Blackwell). Tensorwise (current) scaling casts each weight at its own amax, which suits
    a frozen teacher; delayed scaling takes the scale from earlier forwards (1 before the
    first), so the trainer runs one warm-up forward of the teacher before the first step."""

    def __post_init__(self) -> None:
        if self.recompute_num_layers < 1:
            raise ConfigError(
                f"performance.recompute_num_layers: must be >= 1, got {self.recompute_num_layers}"
            )
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError(
                "performance.distributed_timeout_minutes: must be > 0, got "
                f"{self.distributed_timeout_minutes}"
            )
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            # Upstream Megatron-LM's validate_args refuses this combination too.
            raise ConfigError(
                "performance.overlap_param_gather: needs performance.overlap_grad_reduce=true"
            )


@dataclass
class RolloutConfig:
    """The student answers a share of each global batch's prompts itself (on-policy data).

    A rollout sample's prompt is its record's tokens before the first supervised one; the
    student continues it with the run's current weights (Megatron-Core's KV cache, at the
    run's TP x PP), and prompt + reply replace the record: prompt unsupervised, reply (with
    the EOS that ended it) supervised. The teacher scores it like any other sample. Which
    samples and which tokens depend only on (seed, step, sample index) and the weights.
    """

    fraction: float = 0.0
    """lambda: the share of each global batch answered by the student (0: off-policy, as
    without this section; 1: every sample)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy). On-policy distillation samples at 1."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    """Reply length limit; a reply also stops where prompt + reply fill data.seq_length + 1."""
    seed: int | None = None
    """Row r's uniform at position t is Philox keyed by a hash of (seed, step, sample) at
    counter t (``eval.sampling.counter_uniforms``); None: the run's seed."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"rollout.fraction: must be in [0, 1], got {self.fraction}")
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        _at_least_one("rollout.max_new_tokens", self.max_new_tokens)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


@dataclass
class LoggingConfig:
    log_interval: int = 1

    def __post_init__(self) -> None:
        _at_least_one("logging.log_interval", self.log_interval)


def _at_least_one(key: str, value: int) -> None:
    # Zero would divide by zero (log_interval, chunk_size) or stop at the first skipped
    # step; say so at load time rather than mid-run.
    if value < 1:
        raise ConfigError(f"{key}: must be >= 1, got {value}")


# SIGKILL and SIGSTOP cannot be caught, so a handler for them is never called.
UNCATCHABLE_SIGNALS = frozenset({"SIGKILL", "SIGSTOP"})


def _check_stop_signals(names: list[str]) -> None:
    """Every name is a signal this platform has and a handler can catch."""
    for name in names:
        number = getattr(signal, name, None)
        if not isinstance(number, signal.Signals) or number not in signal.valid_signals():
            raise ConfigError(f"checkpoint.stop_signals: unknown signal {name!r}")
        if name in UNCATCHABLE_SIGNALS:
            raise ConfigError(
                f"checkpoint.stop_signals: {name} cannot be caught (use SIGTERM or SIGUSR1)"
            )


@dataclass
class RunConfig:
    student: ModelSource
    teacher: ModelSource | None = None
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_dir: str = "runs/default"
    seed: int = 1234
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32 or bf16 (the student's parameters; the teacher follows)."""
    device: Device = "auto"
    """auto (CUDA when torch has it; an error when GPUs are visible but torch has no CUDA),
    cuda (required), or cpu (gloo over the CPU emulation, on purpose)."""

    def __post_init__(self) -> None:
        _check_stop_signals(self.checkpoint.stop_signals)
        # Parse the model descriptions now, so their errors come with the recipe's.
        self.student.description("student")
        if self.student.checkpoint is not None:
            raise ConfigError(
                "student.checkpoint: the student's starting weights are "
                "checkpoint.load (the teacher's are teacher.checkpoint)"
            )
        if self.teacher is not None:
            self.teacher.description("teacher")
        if needs_teacher(self.loss.method) and self.teacher is None:
            # The reference code silently distils the student into itself here.
            raise ConfigError(f"teacher: loss.method {self.loss.method!r} needs a teacher")
        self._check_rollout()
        if self.performance.overlap_param_gather and not self.optimizer.use_distributed_optimizer:
            raise ConfigError(
                "performance.overlap_param_gather: needs optimizer.use_distributed_optimizer=true"
            )

    def _check_rollout(self) -> None:
        if not self.rollout.enabled:
            return
        if self.rollout.max_new_tokens >= self.data.seq_length:
            raise ConfigError(
                f"rollout.max_new_tokens: {self.rollout.max_new_tokens} leaves no room for a "
                f"prompt in data.seq_length {self.data.seq_length} (a reply of N tokens needs "
                "a sample of at least N + 1 positions)"
            )
        if self.data.pack:
            raise ConfigError(
                "rollout.fraction: rollouts replace one record per sample; set data.pack=false"
            )

    @property
    def uses_teacher(self) -> bool:
        """A teacher is built and run: the recipe names one and the method needs it
        (SFT trains the student alone, even if the recipe names a teacher)."""
        return self.teacher is not None and needs_teacher(self.loss.method)

    def teacher_description(self) -> ModelDescription | None:
        return self.teacher.description("teacher") if self.uses_teacher else None

    def named_models(self) -> list[tuple[str, ModelDescription]]:
        """("student", ...) and, when used, ("teacher", ...): the models sharing the layout."""
        models = [("student", self.student.description("student"))]
        if self.uses_teacher:
            models.append(("teacher", self.teacher_description()))
        return models

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        per_replica = self.schedule.micro_batch_size * data_parallel_size
        if self.schedule.global_batch_size % per_replica:
            raise ConfigError(
                f"schedule.global_batch_size: {self.schedule.global_batch_size} is not a "
                f"multiple of micro_batch_size x DP = {self.schedule.micro_batch_size} x "
                f"{data_parallel_size}"
            )
        return self.schedule.global_batch_size // per_replica

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML) in a nested mapping."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {override!r}: the value is not valid YAML") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            node = child
        node[parts[-1]] = value
    return raw


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    raw = apply_overrides(expand_variables(load_yaml(path), path), overrides)
    try:
        return from_dict(RunConfig, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
