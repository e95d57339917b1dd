"""What evaluating a checkpoint needs besides its weights: the model, tokenizer, chat format.

``--ckpt`` may name any directory ``load_model_weights`` reads:

- a conversion or an export: ``model.yaml`` beside the weights, and the tokenizer in its
  ``hf/`` folder (a conversion) or beside the weights;
- a training checkpoint root or one of its ``iter_XXXXXXX`` directories: the run's resolved
  config is saved with every checkpoint (``extra["config"]``), so the model is its
  ``student.model`` and the tokenizer the one its ``data.train`` was prepared with (named
  in the data's sidecar, ``PREFIX.json``, with the chat format it used);
- an export written by ``hpd_megatron.train`` (``checkpoint.export_dir``): the run
  directory above it holds ``config.yaml``, read as above when its ``export_dir`` is this
  directory.

Explicit ``--model``, ``--tokenizer`` and ``--chat-template`` win. Nothing here needs a
process group, so a bad path is reported before any rank starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from megatron.core import dist_checkpointing

from hpd_megatron.checkpoint.training_state import TRACKER, latest_step, saved_extra
from hpd_megatron.errors import CheckpointError, ConfigError, DataError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.training.config import ModelSource
from hpd_megatron.training.inputs import checkpoint_dir_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
HF_FILES = "hf"


@dataclass
class CheckpointInfo:
    path: Path
    description: ModelDescription
    tokenizer: Path
    chat_template: str
    """For ``resolve_chat_template``: auto, builtin or a Jinja file."""
    step: int | None
    """The training step of a training checkpoint; None for an export or conversion."""
    training: dict[str, Any] | None
    """The resolved config of the run that wrote the checkpoint, when it can be found."""
    tracking_run_id: str | None
    """That run's MLflow run, when a training checkpoint of it names one."""


def inspect_checkpoint(
    ckpt: str | Path,
    model: str | None = None,
    tokenizer: str | None = None,
    chat_template: str | None = None,
) -> CheckpointInfo:
    path = Path(ckpt)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    training, step, run_id = _training_record(path)
    tokenizer_path, sidecar = _tokenizer(path, tokenizer, training)
    if chat_template is None:
        # The format the training data was prepared with; prepare's default otherwise.
        recorded = (sidecar or {}).get("chat_template", "auto")
        chat_template = "auto" if recorded == "tokenizer" else recorded
    return CheckpointInfo(
        path,
        _description(path, model, training),
        tokenizer_path,
        chat_template,
        step,
        training,
        run_id,
    )


def _training_record(path: Path) -> tuple[dict | None, int | None, str | None]:
    """(resolved training config, step, tracking run id) of the run behind ``path``."""
    if (path / TRACKER).is_file():
        step = latest_step(path)
        extra = saved_extra(path, step)
        return extra.get("config"), step, extra.get("tracking_run_id")
    common = _common_state(path)
    if "step" in common and "extra" in common:  # an iter_XXXXXXX directory
        return (
            common["extra"].get("config"),
            int(common["step"]),
            common["extra"].get("tracking_run_id"),
        )
    config_path = path.parent / "config.yaml"
    if not config_path.is_file():
        return None, None, None
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        return None, None, None  # not a run's resolved config
    export_dir = (
        (config.get("checkpoint") or {}).get("export_dir") if isinstance(config, dict) else None
    )
    if not export_dir or Path(export_dir).resolve() != path.resolve():
        return None, None, None
    checkpoints = checkpoint_dir_of(config.get("run_dir", "."), config["checkpoint"].get("dir"))
    try:
        saved = latest_step(checkpoints)
        run_id = (
            saved_extra(checkpoints, saved).get("tracking_run_id") if saved is not None else None
        )
    except CheckpointError:
        run_id = None  # the export is usable without the run's checkpoints
    return config, None, run_id


def _common_state(path: Path) -> dict[str, Any]:
    try:
        return dist_checkpointing.load_common_state_dict(str(path)) or {}
    except Exception:  # noqa: BLE001 - not a dist checkpoint; load_model_weights says so later
        return {}


def _description(path: Path, model: str | None, training: dict | None) -> ModelDescription:
    if model is not None:
        return ModelDescription.from_yaml(model)
    if (path / "model.yaml").is_file():
        return ModelDescription.from_yaml(path / "model.yaml")
    student = (training or {}).get("student")
    if isinstance(student, dict) and "model" in student:
        try:
            return ModelSource(model=student["model"]).description("student")
        except (ConfigError, OSError) as error:
            raise ConfigError(f"{path}: the training config's student.model: {error}") from None
    raise ConfigError(
        f"{path}: no model.yaml and no training config that names the model; pass --model"
    )


def _tokenizer(path: Path, explicit: str | None, training: dict | None) -> tuple[Path, dict | None]:
    """The tokenizer file, and the training data's sidecar when that is where it came from."""
    if explicit is not None:
        return Path(explicit), None
    for folder in (path / HF_FILES, path):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name, None
    looked = [f"{path / HF_FILES}/ and {path}/ ({' or '.join(TOKENIZER_FILES)})"]
    prefix = ((training or {}).get("data") or {}).get("train")
    if prefix:
        sidecar_path = Path(prefix + ".json")
        if sidecar_path.is_file():
            try:
                sidecar = json.loads(sidecar_path.read_text())
                named = Path(sidecar["tokenizer"]["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{sidecar_path}: not a data sidecar written by tools/prepare_data.py"
                ) from None
            if not named.exists():
                raise DataError(
                    f"{named}: the tokenizer of {path}'s training data (named in {sidecar_path}) "
                    "does not exist; pass --tokenizer"
                )
            return named, sidecar
        looked.append(f"{sidecar_path} (the sidecar of the training data)")
    raise DataError(f"{path}: no tokenizer found (looked in {'; '.join(looked)}); pass --tokenizer")
