"""``DistillationTrainer``: owns one training run on this rank, from set-up to the export.

    trainer = DistillationTrainer(run)   # inputs, process groups, data, models, resume
    try:
        history = trainer.train()        # the loop
    finally:
        trainer.close()

Teacher and student share the TP x PP grid; the objective is the token mean of the loss
over the whole global batch (all micro-batches and data-parallel replicas), so
micro-batch size and DP size do not change the update. To change a part in a test or an
experiment, subclass and override ``build_models``, ``build_objective`` or ``train_step``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state

from hpd_megatron.checkpoint.checkpointer import Checkpointer
from hpd_megatron.checkpoint.run_lock import RUN_LOCK, DirectoryLock, acquire_on_rank_zero
from hpd_megatron.checkpoint.signals import StopRequested
from hpd_megatron.data.files import staged_files
from hpd_megatron.errors import NonFiniteTraining
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.models.dtypes import DTYPES
from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
from hpd_megatron.plan import training_flops_per_token
from hpd_megatron.tracking import redacted_config
from hpd_megatron.training.components import (
    Models,
    build_models,
    build_optimizer,
    gradients_are_finite,
    parameters_gathered,
)
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.feed import TrainingFeed
from hpd_megatron.training.inputs import check_inputs, locked_directories
from hpd_megatron.training.metrics import (
    MetricsLogger,
    peak_memory_gb,
    reduce_reports,
    step_attention_span,
)
from hpd_megatron.training.objective import DistillationObjective
from hpd_megatron.training.performance import resolve_performance
from hpd_megatron.training.rollout import RolloutMaker
from hpd_megatron.training.schedule import run_schedule


@dataclass
class StepResult:
    step: int
    applied: bool
    """False when the gradients were not finite and the update was skipped."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The step's metrics on the last pipeline stage; empty on the other stages."""


class DistillationTrainer:
    def __init__(self, run: RunConfig) -> None:
        """Everything before the first step; a failure here leaves no process group."""
        self.run = run
        # Models first as descriptions: validation needs no process group.
        self.named_models = run.named_models()
        self.student_description, self.teacher_description = self._descriptions()
        # Every missing path and tokenizer mismatch at once, before any process group or GPU.
        check_inputs(run)
        # A setting this node cannot run stops here, before any process group.
        self.performance = resolve_performance(run, run.parallel.tensor_model_parallel_size)
        self.context = initialize_parallel(
            run.parallel,
            seed=run.seed,
            models=self.named_models,
            timeout_minutes=run.performance.distributed_timeout_minutes,
            device=run.device,
        )
        if self.context.is_logging_rank:
            print(self._startup_line(), flush=True)
        self.checkpointer: Checkpointer | None = None
        self.metrics: MetricsLogger | None = None
        self.run_locks: list[DirectoryLock] = []
        try:
            # One job per run directory (and per checkpoint directory, which may lie
            # elsewhere), taken before anything is written there.
            for directory, what in locked_directories(run):
                lock = acquire_on_rank_zero(directory / RUN_LOCK, what)
                self.run_locks += [lock] if lock is not None else []
            self._set_up()
        except BaseException:
            if self.metrics is not None:
                self.metrics.finish("FAILED")
            self.close()
            raise

    def _startup_line(self) -> str:
        """What this run computes on, in one line: the first thing to check on a new cluster."""
        student, teacher_settings = self.performance.student, self.performance.teacher
        spec = "local"
        if student.use_transformer_engine:  # the version a site's container really has
            spec = f"transformer_engine {self.performance.transformer_engine_version}"
        apex = "apex" if importlib.util.find_spec("apex") is not None else "no apex"
        if student.overrides["sequence_parallel"]:
            spec += ", sequence parallel"
        names = {dtype: name for name, dtype in DTYPES.items()}  # the recipes' spelling
        teacher = ""
        if self.teacher_description is not None:
            fp8 = teacher_settings.overrides.get("fp8_recipe")
            fp8 = f" with fp8 linears ({fp8} scaling)" if fp8 else ""
            teacher = f", teacher {names[teacher_settings.params_dtype]}{fp8}"
        return (
            f"hpd-megatron: backend {self.context.backend}, device {self.context.device.type}, "
            f"layer spec {spec} ({apex}), student {names[student.params_dtype]}{teacher}, "
            f"layout {self.context.layout.describe()}"
        )

    def _descriptions(self) -> tuple[ModelDescription, ModelDescription | None]:
        models = dict(self.named_models)
        return models["student"], models.get("teacher")

    def _set_up(self) -> None:
        run, context = self.run, self.context
        self.checkpointer = Checkpointer.for_run(run)
        resume_step = self.checkpointer.latest_step()
        self.first_step = 1 if resume_step is None else resume_step + 1
        self.metrics = MetricsLogger.for_run(run, context, self.checkpointer.saved_tracking_run())
        run.micro_batches_per_step(context.layout.data_parallel_size)  # must split evenly
        self._write_resolved_config()
        self.feed = TrainingFeed(
            run,
            self.student_description,
            dp_rank=context.dp_rank,
            dp_size=context.layout.data_parallel_size,
        )
        if context.is_logging_rank:  # how much of each step is padding
            print(self.feed.dataset.describe(), flush=True)
        # A run whose checkpoint directory holds a complete save resumes from it; otherwise
        # the student starts from checkpoint.load (or a random initialisation).
        self.models = self.build_models(resuming=resume_step is not None)
        self.optimizer, self.scheduler = build_optimizer(run, self.models.student)
        self.models.pair.train()
        self.objective = self.build_objective()
        self.rollouts = self._rollout_maker()
        if resume_step is not None:
            extra = self.checkpointer.resume(
                resume_step, self.models.student.module, self.optimizer, self.scheduler
            )
            self.feed.load_state_dict(extra["sampler"])
        self.skipped_steps = self.consecutive_nonfinite = 0
        # The teacher is not checkpointed: a resumed run warms it up again.
        self.teacher_fp8_warm_up = self.performance.teacher.overrides.get("fp8_recipe") == "delayed"

    def _write_resolved_config(self) -> None:
        run_dir = Path(self.run.run_dir)
        if self.context.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            with staged_files([run_dir / "config.yaml"]) as (resolved,):
                resolved.write_text(yaml.safe_dump(redacted_config(self.run), sort_keys=False))
        torch.distributed.barrier()
        self.metrics.log_artifact(run_dir / "config.yaml")

    def build_models(self, resuming: bool) -> Models:
        """Student (DDP, trainable) and frozen teacher stages at this rank's grid position."""
        return build_models(
            self.run, self.student_description, self.teacher_description, resuming=resuming
        )

    def _rollout_maker(self) -> RolloutMaker | None:
        if not self.run.rollout.enabled:
            return None  # off-policy: the step is exactly what it was without rollouts
        dataset = self.feed.dataset
        return RolloutMaker(
            self.run.rollout,
            dataset,
            self.run.seed,
            self.student_description.vocab_size,
            dataset.meta.get("tokenizer", {}).get("eos_id"),
        )

    def build_objective(self) -> DistillationObjective:
        return DistillationObjective(self.run, self.student_description.vocab_size)

    def train(self) -> list[dict[str, float]]:
        """The loop: a step, then the checkpointer's save and stop decision; the export."""
        with self.metrics.run_status():
            for step in range(self.first_step, self.run.schedule.train_steps + 1):
                self.train_step(step)
                decision = self.checkpointer.after_step(step)
                if decision.save:
                    self.save(step)
                if decision.stop == "signal":
                    raise StopRequested(step)
                if decision.stop == "exit_interval":
                    self.metrics.finish("KILLED")  # the next launch continues the run
                    return self.metrics.history
            with parameters_gathered(self.models.student):
                self.checkpointer.export(self.models.student.module, self.student_description)
        return self.metrics.history

    def train_step(self, step: int) -> StepResult:
        """Forward and backward of the global batch, the update, the metrics.

        A step whose gradients are not finite is skipped (no update, no LR step) and
        counted; ``optimizer.max_consecutive_nonfinite`` of them in a row end the run.
        """
        start = time.perf_counter()
        micro_batches, rollout_metrics = self._roll_out(step, self.feed.next_step())
        if self.teacher_fp8_warm_up:
            self._warm_up_fp8_teacher(step, micro_batches)
        self.models.student.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_pair(step, micro_batches)
        applied, grad_norm = self._apply_gradients()
        teacher_s = self.models.pair.teacher_timer.take_seconds()
        metrics = self._step_metrics(reports, grad_norm, time.perf_counter() - start)
        if metrics:
            metrics.update(rollout_metrics)
            metrics.update(_time_split(metrics["step_time_s"], teacher_s, rollout_metrics))
        self.metrics.log(step, metrics)
        self._check_nonfinite_limit(step)
        return StepResult(step, applied, metrics)

    def _warm_up_fp8_teacher(self, step: int, micro_batches: list) -> None:
        """One forward of the step's batch, its output unused, before the first update.

        With delayed FP8 scaling a weight's scale comes from the amax of earlier forwards,
        and is 1 before any: the first step's teacher would compute with weights cast at
        scale 1 (TE's ``DelayedScaling``). This forward fills the history first.
        """
        self._run_pair(step, micro_batches, forward_only=True)
        self.teacher_fp8_warm_up = False

    def _run_pair(self, step: int, micro_batches: list, forward_only: bool = False) -> list:
        """The step's micro-batches through the pair and the loss; the loss reports."""
        return run_schedule(
            self.models.pair,
            micro_batches,
            partial(self.objective.forward_step, step),
            seq_length=self.run.data.seq_length,
            micro_batch_size=self.run.schedule.micro_batch_size,
            adjust_tensor_shapes_fn=self.models.pair.adjust_tensor_shapes,
            forward_only=forward_only,
        )

    def _roll_out(self, step: int, micro_batches: list) -> tuple[list, dict[str, float]]:
        """The student's replies in place of a share of the step's samples (rollout:)."""
        if self.rollouts is None:
            return micro_batches, {}
        start = time.perf_counter()
        share = self.run.schedule.global_batch_size // self.context.layout.data_parallel_size
        with parameters_gathered(self.models.student):
            micro_batches, stats = self.rollouts.replace(
                self.models.student.module, step, micro_batches, self.context.dp_rank * share
            )
        metrics = stats.reduced()
        metrics["time/rollout_s"] = time.perf_counter() - start
        return micro_batches, metrics

    def _apply_gradients(self) -> tuple[bool, float]:
        """The optimizer step when every rank's gradients are finite; (applied, grad norm)."""
        if not gradients_are_finite(self.models.student):
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            return False, float("nan")
        updated, grad_norm, _ = self.optimizer.step()
        self.consecutive_nonfinite = 0
        if updated:
            self.scheduler.step(increment=1)
        return updated, float(grad_norm) if grad_norm is not None else float("nan")

    def _step_metrics(self, reports: list, grad_norm: float, elapsed: float) -> dict[str, float]:
        if not parallel_state.is_pipeline_last_stage():
            return {}
        metrics = reduce_reports(reports)
        tokens = metrics.pop("num_tokens")
        # The step's model FLOPs over all ranks (the console's MFU): packed, each record
        # attends only to itself, so the span comes from the step's own records.
        flops_per_token = training_flops_per_token(
            self.student_description,
            self.teacher_description,
            step_attention_span(self.feed.dataset, self.feed.sampler),
            self.run.parallel.tensor_model_parallel_size,
        )
        positions = self.run.schedule.global_batch_size * self.run.data.seq_length
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            step_time_s=elapsed,
            tokens_per_s=tokens / elapsed,
            supervised_tokens=tokens,
            peak_memory_gb=peak_memory_gb(),  # this step's (GPU); the process's so far (CPU)
            skipped_steps=self.skipped_steps,
            model_flops=positions * flops_per_token,
        )
        return metrics

    def _check_nonfinite_limit(self, step: int) -> None:
        count = self.consecutive_nonfinite
        if count >= self.run.optimizer.max_consecutive_nonfinite:
            raise NonFiniteTraining(
                f"steps {step - count + 1}..{step}: loss or gradients not finite {count} times "
                f"in a row (optimizer.max_consecutive_nonfinite); the last checkpoint in "
                f"{self.checkpointer.directory} is intact"
            )

    def save(self, step: int) -> None:
        """Collective: the student, optimizer, schedule, data position and tracking run."""
        extra = {
            "sampler": self.feed.state_dict(),
            "config": redacted_config(self.run),
            **self.metrics.tracking_run(),
        }
        with parameters_gathered(self.models.student):
            saved = self.checkpointer.save(
                step, self.models.student.module, self.optimizer, self.scheduler, extra
            )
        if self.run.tracking.log_checkpoints:
            self.metrics.log_artifact(saved, "checkpoints")

    def close(self) -> None:
        """Restore the signal handlers and tear the process groups down (always call it)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        for lock in self.run_locks:
            lock.release()
        destroy_parallel()


def _time_split(step_time: float, teacher: float, rollout_metrics: dict) -> dict[str, float]:
    """The step's time in rollouts, the teacher's forward and the rest (the student's
    training), as this rank saw them; with rollouts, their share of the step."""
    rollout = rollout_metrics.get("time/rollout_s", 0.0)
    split = {"time/teacher_s": teacher, "time/train_s": step_time - rollout - teacher}
    if "time/rollout_s" in rollout_metrics:
        split["rollout/share"] = rollout / step_time
    return split
