"""The run's checkpoint manager: resume, when to save and stop, retention, and the export.

After every step the trainer asks ``after_step``: save now (``checkpoint.save_interval``,
the last step, a stop), and stop after saving (a signal, ``schedule.exit_interval``)?
Saves are published all or nothing (``publish.py``); the tracker file names the newest
complete one, and only ``checkpoint.keep_last`` of them are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpd_megatron.checkpoint.signals import StopSignals
from hpd_megatron.checkpoint.training_state import (
    iteration_dir,
    latest_step,
    load_checkpoint,
    remove_old_checkpoints,
    save_checkpoint,
    saved_extra,
)
from hpd_megatron.checkpoint.weights import export_model_weights, not_an_export
from hpd_megatron.errors import CheckpointError, ConfigError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import logging_rank
from hpd_megatron.training.config import CheckpointConfig, RunConfig
from hpd_megatron.training.inputs import checkpoint_dir


def check_export_dir(run: RunConfig) -> None:
    """``checkpoint.export_dir`` is safe to replace at the end: refused at start otherwise.

    The export replaces its directory, so one that is (or holds) the run directory or the
    checkpoints, or that holds anything an export does not write, would be deleted.
    """
    if not run.checkpoint.export_dir:
        return
    export = Path(run.checkpoint.export_dir)
    for key, path in (("run_dir", Path(run.run_dir)), ("checkpoint.dir", checkpoint_dir(run))):
        if export.resolve() in (path.resolve(), *path.resolve().parents):
            raise ConfigError(
                f"checkpoint.export_dir: {export} is or contains the {key} {path}, which the "
                "export would replace; choose a directory of its own (e.g. RUN_DIR/export)"
            )
    for existing in (export, export.with_name(export.name + ".previous")):
        reason = not_an_export(existing) if existing.exists() else None
        if reason is not None:
            raise ConfigError(
                f"checkpoint.export_dir: {existing}: {reason}; refusing to replace it "
                "(remove it or choose another)"
            )


@dataclass(frozen=True)
class AfterStep:
    """What to do once a step is done: save, and then stop (and why)."""

    save: bool
    stop: str | None = None
    """None, "signal" (exit for a requeue) or "exit_interval" (end this launch)."""


class Checkpointer:
    def __init__(
        self,
        config: CheckpointConfig,
        directory: Path,
        train_steps: int,
        exit_interval: int,
        fully_parallel_save: bool = True,
        fully_parallel_load: bool = False,
    ) -> None:
        self.config = config
        self.fully_parallel_save = fully_parallel_save
        self.fully_parallel_load = fully_parallel_load
        self.directory = directory
        self.train_steps = train_steps
        self.exit_interval = exit_interval
        self.signals = StopSignals(config.stop_signals)

    @classmethod
    def for_run(cls, run: RunConfig) -> Checkpointer:
        check_export_dir(run)  # at start, not after the training it would end
        return cls(
            run.checkpoint,
            checkpoint_dir(run),
            run.schedule.train_steps,
            run.schedule.exit_interval,
            run.performance.fully_parallel_save,
            run.performance.fully_parallel_load,
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete save in the run's directory (None: a new run)."""
        return latest_step(self.directory)

    def saved_tracking_run(self) -> dict[str, str | None]:
        """The MLflow run id and token the latest save kept (empty when there is none)."""
        try:
            step = self.latest_step()
            extra = {} if step is None else saved_extra(self.directory, step)
        except CheckpointError:
            extra = {}  # every rank meets the same problem, and reports it, when it resumes
        return {key: extra.get(key) for key in ("tracking_run_id", "tracking_run_token")}

    def resume(
        self, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any
    ) -> dict[str, Any]:
        """Load the save of ``step`` into the student, optimizer and schedule; its ``extra``."""
        extra = load_checkpoint(
            self.directory,
            step,
            model,
            optimizer,
            scheduler,
            load_optimizer=self.config.load_optimizer,
            fully_parallel=self.fully_parallel_load,
        )
        if dist.get_rank() == logging_rank():
            print(f"resumed from {iteration_dir(self.directory, step)}", flush=True)
        return extra

    def after_step(self, step: int) -> AfterStep:
        """Collective (the ranks agree on stop signals): the decision after ``step``."""
        before_the_end = step < self.train_steps
        if self.signals.agreed() and before_the_end:
            return AfterStep(save=True, stop="signal")
        if self.exit_interval and step % self.exit_interval == 0 and before_the_end:
            return AfterStep(save=True, stop="exit_interval")
        interval = self.config.save_interval
        return AfterStep(save=bool(interval) and (step % interval == 0 or not before_the_end))

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        extra: dict[str, Any],
    ) -> Path:
        """Collective: publish the save of ``step``, then keep only the newest ones."""
        saved = save_checkpoint(
            self.directory,
            step,
            model,
            optimizer,
            scheduler,
            extra=extra,
            optimizer_format=self.config.optimizer_format,
            fully_parallel=self.fully_parallel_save,
        )
        if dist.get_rank() == 0:
            remove_old_checkpoints(self.directory, self.config.keep_last)
        dist.barrier()
        return saved

    def export(self, model: torch.nn.Module, description: ModelDescription) -> None:
        """Collective: the trained student's model-only weights, when ``export_dir`` is set."""
        if self.config.export_dir:
            export_model_weights(
                model,
                self.config.export_dir,
                description=description,
                hf_files_from=self.config.load,
                fully_parallel=self.fully_parallel_save,
            )

    def close(self) -> None:
        self.signals.restore()
