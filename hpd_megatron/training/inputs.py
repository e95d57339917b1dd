"""Check every path a run reads before any process group, GPU or model exists.

A multi-node job that finds a mistyped data prefix only when its dataset is built has
already spent minutes starting up on every node. ``check_inputs`` runs first, in the
trainer on every rank and in the Slurm templates on the batch host (through
``python -m hpd_megatron.plan --check-inputs``), and names each missing path at once.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hpd_megatron.checkpoint.training_state import CheckpointError, latest_step
from hpd_megatron.checkpoint.verify import read_index
from hpd_megatron.checkpoint.weights import weights_directory
from hpd_megatron.data.files import read_json_object
from hpd_megatron.data.prepare import LOSS_MASK_SUFFIX, TOKENS_SUFFIX
from hpd_megatron.data.tokenizer import TokenizerIdentity, tokenizer_mismatch
from hpd_megatron.errors import ConfigError, HpdError
from hpd_megatron.training.config import RunConfig


def checkpoint_dir(run: RunConfig) -> Path:
    """Where the run's own training checkpoints live (and where it resumes from)."""
    return checkpoint_dir_of(run.run_dir, run.checkpoint.dir)


def checkpoint_dir_of(run_dir: str, configured: str | None) -> Path:
    """``checkpoint.dir``, else ``<run_dir>/checkpoints`` (also for a run's saved config)."""
    return Path(configured or Path(run_dir) / "checkpoints")


def locked_directories(run: RunConfig) -> list[tuple[Path, str]]:
    """The directories one job owns, each with its name for the refusal: the run directory
    and, when it lies outside it, the checkpoint directory (two runs sharing one would
    delete each other's saves through retention)."""
    run_dir, checkpoints = Path(run.run_dir), checkpoint_dir(run)
    owned = [(run_dir, f"run_dir {run_dir}")]
    if not checkpoints.resolve().is_relative_to(run_dir.resolve()):
        owned.append((checkpoints, f"checkpoint.dir {checkpoints}"))
    return owned


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


def tokenizer_identities(run: RunConfig) -> list[TokenizerIdentity]:
    """The student's, the teacher's (when used) and the data's tokenizer, as each records it.

    A converter writes the fingerprint into model.yaml's ``extra``; prepare_data writes it
    into the data's sidecar.
    """
    identities = []
    for name, description in run.named_models():
        source = getattr(run, name).model
        owner = f"{name}.model" + (f" ({source})" if isinstance(source, str) else "")
        fingerprint = description.extra.get("tokenizer_fingerprint")
        identities.append(TokenizerIdentity(owner, description.vocab_size, fingerprint))
    sidecar = Path(run.data.train + ".json")
    if run.data.train and sidecar.is_file():
        recorded = read_json_object(sidecar).get("tokenizer") or {}
        identities.append(
            TokenizerIdentity(
                f"data.train ({sidecar})", recorded.get("vocab_size"), recorded.get("fingerprint")
            )
        )
    return identities


def tokenizer_problems(run: RunConfig) -> list[str]:
    """HPD compares teacher and student id by id, on the data's ids: one tokenizer for all."""
    try:
        identities = tokenizer_identities(run)
    except HpdError as error:  # an unreadable sidecar or description
        return [str(error)]
    problems = (tokenizer_mismatch(a, b) for a, b in itertools.combinations(identities, 2))
    return [
        f"{problem}: teacher, student and data must share one tokenizer"
        for problem in problems
        if problem is not None
    ]


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
    return problems + tokenizer_problems(run)


def check_inputs(run: RunConfig) -> None:
    """Raise one ConfigError listing every missing, damaged or mismatched input of ``run``."""
    problems = input_problems(run)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"{len(problems)} inputs are missing, damaged or mismatched:\n  "
            + "\n  ".join(problems)
        )
