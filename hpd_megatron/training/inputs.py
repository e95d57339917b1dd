"""Check every path a run reads before any process group, GPU or model exists.

A multi-node job that finds a mistyped data prefix only when its dataset is built has
already spent minutes starting up on every node. ``check_inputs`` runs first, in the
trainer on every rank and in the Slurm templates on the batch host (through
``python -m hpd_megatron.plan --check-inputs``), and names each missing path at once.
"""

from __future__ import annotations

from pathlib import Path

from hpd_megatron.checkpoint.training_state import CheckpointError, latest_step
from hpd_megatron.checkpoint.verify import read_index
from hpd_megatron.checkpoint.weights import weights_directory
from hpd_megatron.data.prepare import LOSS_MASK_SUFFIX, TOKENS_SUFFIX
from hpd_megatron.errors import ConfigError
from hpd_megatron.training.config import RunConfig


def checkpoint_dir(run: RunConfig) -> Path:
    """Where the run's own training checkpoints live (and where it resumes from)."""
    return checkpoint_dir_of(run.run_dir, run.checkpoint.dir)


def checkpoint_dir_of(run_dir: str, configured: str | None) -> Path:
    """``checkpoint.dir``, else ``<run_dir>/checkpoints`` (also for a run's saved config)."""
    return Path(configured or Path(run_dir) / "checkpoints")


def _weights_problem(key: str, path: str) -> list[str]:
    try:
        read_index(weights_directory(path))
    except CheckpointError as error:
        return [f"{key}: {error}"]
    return []


def _data_problems(prefix: str) -> list[str]:
    files = [prefix + ".json"] + [
        prefix + suffix + ext
        for suffix in (TOKENS_SUFFIX, LOSS_MASK_SUFFIX)
        for ext in (".bin", ".idx")
    ]
    missing = [name for name in files if not Path(name).is_file()]
    if missing:  # the first is enough: one missing file usually means the prefix is wrong
        return [
            f"data.train: {missing[0]}: no such file (write the dataset with tools/prepare_data.py)"
        ]
    return []


def input_problems(run: RunConfig) -> list[str]:
    """One line per unreadable input: teacher weights, starting weights, data."""
    problems: list[str] = []
    if run.uses_teacher:
        if not run.teacher.checkpoint:
            problems.append(
                f"teacher.checkpoint: not set (loss.method {run.loss.method!r} needs "
                "the teacher's weights)"
            )
        else:
            problems += _weights_problem("teacher.checkpoint", run.teacher.checkpoint)
    try:
        resuming = latest_step(checkpoint_dir(run)) is not None
    except CheckpointError as error:
        problems.append(f"checkpoint.dir: {error}")
        resuming = True
    # A resumed run reads its own checkpoint; the starting weights are no longer needed.
    if run.checkpoint.load and not resuming:
        problems += _weights_problem("checkpoint.load", run.checkpoint.load)
    if not run.data.train:
        problems.append("data.train: not set (the prefix written by tools/prepare_data.py)")
    else:
        problems += _data_problems(run.data.train)
    return problems


def check_inputs(run: RunConfig) -> None:
    """Raise one ConfigError listing every missing or damaged input of ``run``."""
    problems = input_problems(run)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"{len(problems)} inputs are missing or damaged:\n  " + "\n  ".join(problems)
        )
