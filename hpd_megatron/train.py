"""Distil a frozen teacher into a student with Megatron-Core: one script, top to bottom.

    torchrun --nproc-per-node N -m hpd_megatron.train --config recipes/NAME.yaml [key=value ...]

The recipe (YAML) maps onto ``RunConfig``; ``dotted.key=value`` arguments override it.
Teacher and student share the TP x PP grid; the objective is the token mean of the
loss over the whole global batch (all micro-batches and data-parallel replicas), so
micro-batch size and DP size do not change the update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state

from hpd_megatron.checkpoint.signals import STOP_EXIT_CODE, StopRequested, StopSignals
from hpd_megatron.checkpoint.training_state import (
    CheckpointError,
    iteration_dir,
    latest_step,
    load_checkpoint,
    save_checkpoint,
    saved_extra,
)
from hpd_megatron.checkpoint.weights import export_model_weights
from hpd_megatron.data.files import staged_files
from hpd_megatron.errors import ConfigError, DataError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import ParallelContext, destroy_parallel, initialize_parallel
from hpd_megatron.tracking import NullTracker, Tracker, start_tracking
from hpd_megatron.training.components import (
    build_models,
    build_optimizer,
    check_shared_vocabulary,
    gradients_are_finite,
    make_forward_step,
    reduce_reports,
)
from hpd_megatron.training.config import RunConfig, load_run_config
from hpd_megatron.training.feed import TrainingFeed
from hpd_megatron.training.inputs import check_inputs, checkpoint_dir
from hpd_megatron.training.schedule import run_schedule


def train(run: RunConfig) -> list[dict[str, float]]:
    """Run ``run`` on this process's rank; returns the per-step metrics on the logging rank."""
    # 1. Models first as descriptions: validation needs no process group.
    student_description = run.student.description("student")
    # SFT trains the student alone: no teacher is built even if the recipe names one.
    uses_teacher = run.teacher is not None and run.loss.method != "sft"
    teacher_description = run.teacher.description("teacher") if uses_teacher else None
    check_shared_vocabulary(student_description, teacher_description)
    check_inputs(run)  # every missing path at once, before any process group or GPU
    models_for_layout = [("student", student_description)]
    if teacher_description is not None:
        models_for_layout.append(("teacher", teacher_description))

    # 2. Process groups, grid position, seeds.
    context = initialize_parallel(run.parallel, seed=run.seed, models=models_for_layout)
    try:
        with (
            StopSignals(run.checkpoint.stop_signals) as stop_signals,
            _tracking(run, context) as tracker,
        ):
            return _train_on_this_rank(
                run, context, student_description, teacher_description, stop_signals, tracker
            )
    finally:
        destroy_parallel()  # on success, a stop, or an error alike


@contextmanager
def _tracking(run: RunConfig, context: ParallelContext) -> Iterator[Tracker]:
    """MLflow on the logging rank (the run continues the one its checkpoint names); the run
    ends FINISHED, KILLED on a stop (signal or exit_interval) or FAILED on an error."""
    tracker: Tracker = NullTracker()
    if context.rank == context.world_size - 1:
        tracker = start_tracking(
            run.tracking,
            Path(run.run_dir),
            run.to_dict(),
            **_saved_tracking_run(checkpoint_dir(run)),
            tags={"world_size": str(context.world_size), "layout": context.layout.describe()},
        )
        sbatch_script = os.environ.get("HPD_SBATCH_SCRIPT")
        if sbatch_script and Path(sbatch_script).is_file():
            tracker.log_artifact(sbatch_script, "slurm")
    try:
        yield tracker
    except StopRequested:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")  # no-op when the loop already ended the run (exit_interval)


def _saved_tracking_run(checkpoint_dir: Path) -> dict[str, str | None]:
    """start_tracking's run_id and run_token from the latest checkpoint (None: none saved)."""
    try:
        step = latest_step(checkpoint_dir)
        extra = {} if step is None else saved_extra(checkpoint_dir, step)
    except CheckpointError:
        extra = {}  # every rank meets the same problem, and reports it, when it resumes
    return {"run_id": extra.get("tracking_run_id"), "run_token": extra.get("tracking_run_token")}


def _train_on_this_rank(
    run: RunConfig,
    context: ParallelContext,
    student_description: ModelDescription,
    teacher_description: ModelDescription | None,
    stop_signals: StopSignals,
    tracker: Tracker,
) -> list[dict[str, float]]:
    data_parallel_size = context.layout.data_parallel_size
    run.micro_batches_per_step(data_parallel_size)  # the global batch must split evenly
    run_dir = Path(run.run_dir)
    is_logging_rank = context.rank == context.world_size - 1  # last stage: where the loss is
    if context.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with staged_files([run_dir / "config.yaml"]) as (resolved,):
            resolved.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    torch.distributed.barrier()
    tracker.log_artifact(run_dir / "config.yaml")

    # 3. Data: this data-parallel rank's share of each global batch.
    feed = TrainingFeed(
        run, student_description, dp_rank=context.dp_rank, dp_size=data_parallel_size
    )

    # 4. Student (trainable, DDP) and teacher (frozen) stages; optimizer and LR schedule.
    #    A run whose checkpoint directory holds a complete save resumes from it; otherwise
    #    the student starts from checkpoint.load (or a random initialisation).
    checkpoints = checkpoint_dir(run)
    resumed_from = latest_step(checkpoints)
    models = build_models(
        run, student_description, teacher_description, resuming=resumed_from is not None
    )
    optimizer, scheduler = build_optimizer(run, models.student)
    models.pair.train()
    first_step = 1
    if resumed_from is not None:
        extra = load_checkpoint(
            checkpoints,
            resumed_from,
            models.student.module,
            optimizer,
            scheduler,
            load_optimizer=run.checkpoint.load_optimizer,
        )
        feed.load_state_dict(extra["sampler"])
        first_step = resumed_from + 1
        if is_logging_rank:
            print(f"resumed from {iteration_dir(checkpoints, resumed_from)}", flush=True)

    # 5. The loop.
    history: list[dict[str, float]] = []
    metrics_file = run_dir / "metrics.jsonl"
    last_step = run.schedule.train_steps
    skipped_steps = consecutive_nonfinite = 0
    for step in range(first_step, last_step + 1):
        start = time.perf_counter()
        micro_batches = feed.next_step()
        models.student.zero_grad_buffer()
        optimizer.zero_grad()
        reports = run_schedule(
            models.pair,
            micro_batches,
            make_forward_step(run, models, step),
            seq_length=run.data.seq_length,
            micro_batch_size=run.schedule.micro_batch_size,
            adjust_tensor_shapes_fn=models.pair.adjust_tensor_shapes,
        )
        if gradients_are_finite(models.student):
            updated, grad_norm, _ = optimizer.step()
            consecutive_nonfinite = 0
        else:
            updated, grad_norm = False, float("nan")
            skipped_steps += 1
            consecutive_nonfinite += 1
        if updated:
            scheduler.step(increment=1)
        elapsed = time.perf_counter() - start

        if parallel_state.is_pipeline_last_stage():
            metrics = reduce_reports(reports)
            tokens = metrics.pop("num_tokens")
            metrics.update(
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                step_time_s=elapsed,
                tokens_per_s=tokens / elapsed,
                supervised_tokens=tokens,
                peak_memory_gb=_peak_memory_gb(),
                skipped_steps=skipped_steps,
            )
            if is_logging_rank:
                tracker.log_metrics(metrics, step)
                history.append({"step": step, **metrics})
                with metrics_file.open("a") as out:
                    out.write(json.dumps({"step": step, **metrics}) + "\n")
                if step % run.logging.log_interval == 0 or step == run.schedule.train_steps:
                    print(_format_step(step, run.schedule.train_steps, metrics), flush=True)

        if consecutive_nonfinite >= run.optimizer.max_consecutive_nonfinite:
            raise NonFiniteTraining(
                f"steps {step - consecutive_nonfinite + 1}..{step}: loss or gradients not finite "
                f"{consecutive_nonfinite} times in a row (optimizer.max_consecutive_nonfinite); "
                f"the last checkpoint in {checkpoints} is intact"
            )

        interval, exit_interval = run.checkpoint.save_interval, run.schedule.exit_interval
        signalled = stop_signals.agreed() and step < last_step
        stop = signalled or (bool(exit_interval) and step % exit_interval == 0 and step < last_step)
        if stop or (interval and (step % interval == 0 or step == last_step)):
            # The run id lives on the logging rank; rank 0 writes the plain entries.
            # The run id may not exist yet (the server is slow or down); the token always does.
            tracking_run = [tracker.run_id, tracker.run_token]
            torch.distributed.broadcast_object_list(tracking_run, src=context.world_size - 1)
            saved = save_checkpoint(
                checkpoints,
                step,
                models.student.module,
                optimizer,
                scheduler,
                extra={
                    "sampler": feed.state_dict(),
                    "config": run.to_dict(),
                    "tracking_run_id": tracking_run[0],
                    "tracking_run_token": tracking_run[1],
                },
                keep_last=run.checkpoint.keep_last,
                optimizer_format=run.checkpoint.optimizer_format,
            )
            if run.tracking.log_checkpoints:
                tracker.log_artifact(saved, "checkpoints")
        if signalled:
            raise StopRequested(step)
        if stop:
            tracker.finish("KILLED")  # stopped before train_steps; the next launch continues
            return history

    # 6. The trained student, model-only, for evaluation, conversion or the next stage.
    if run.checkpoint.export_dir:
        export_model_weights(
            models.student.module,
            run.checkpoint.export_dir,
            description=student_description,
            hf_files_from=run.checkpoint.load,
        )
    return history


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _format_step(step: int, total: int, metrics: dict[str, float]) -> str:
    shown = ("loss", "cross_entropy", "lr", "grad_norm", "tokens_per_s", "step_time_s")
    parts = [f"{name} {metrics[name]:.4g}" for name in shown if name in metrics]
    parts += [f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith("hpd/")]
    return f"step {step}/{total}: " + "  ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HPD distillation on Megatron-Core")
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        train(load_run_config(args.config, args.overrides))
    except (ConfigError, DataError, CheckpointError, NonFiniteTraining) as error:
        # Bad input: one line naming the file or key, not a traceback from every rank.
        sys.exit(f"error: {error}")
    except StopRequested as stopped:
        print(stopped, flush=True)
        sys.exit(STOP_EXIT_CODE)


if __name__ == "__main__":
    main()
