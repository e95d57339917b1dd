"""Check a distributed checkpoint before loading it, so that damage is reported by name.

``torch.distributed.checkpoint`` fails deep inside a read plan on a truncated file or a
tensor of another shape, with a message that names neither the file nor the model
field. Both checks here are cheap (the ``.metadata`` index and file sizes, no tensor
data) and every rank reaches the same verdict, so all ranks raise together instead of
leaving the others blocked in a collective.

The index is read here first, through a restricted unpickler, because ``.metadata`` is a
pickle: torch's ``FileSystemReader.read_metadata`` (also inside ``dist_checkpointing.load``)
would run whatever a tampered one names. Every load goes through ``read_index`` before
anything else opens the checkpoint, so the later unrestricted reads only see a checked
index.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.serialization
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import filesystem, planner
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from hpd_megatron.errors import CheckpointError

# What a DCP index holds (found by reading every index the project's saves write): the
# metadata and save-plan dataclasses and enums, the file layout of each item, torch.Size,
# dtypes and layouts. Nothing here runs code when built from pickled arguments.
_INDEX_MODULES = (dcp_metadata, planner)
_INDEX_GLOBALS = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
UNSAFE_LOAD_VARIABLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _index_global(module: str, name: str) -> Any:
    """The object a DCP index may name, or None for anything else."""
    if (module, name) in _INDEX_GLOBALS:
        return _INDEX_GLOBALS[module, name]
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
        return getattr(torch, name)
    for allowed in _INDEX_MODULES:
        found = getattr(allowed, name, None) if module == allowed.__name__ else None
        if isinstance(found, type) and found.__module__ == module:
            return found
    return None


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _index_global(module, name)
        if found is None:
            raise CheckpointError(
                f"{self.path}: refused: names {module}.{name}, which a checkpoint index never "
                "holds (a tampered or foreign file; nothing was loaded)"
            )
        return found


def _load_index(index_file: Path) -> Metadata:
    """``.metadata`` unpickled with only the classes an index holds (module doc)."""
    try:
        with open(index_file, "rb") as file:
            index = _IndexUnpickler(file, index_file).load()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(
            f"{index_file}: unreadable ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(index, Metadata):
        raise CheckpointError(f"{index_file}: not a checkpoint index ({type(index).__name__})")
    return index


def check_safe_loading() -> None:
    """Refuse to open checkpoints while torch is told to unpickle ``common.pt`` unrestricted."""
    if os.environ.get(UNSAFE_LOAD_VARIABLE, "0").lower() in ("1", "y", "yes", "true"):
        raise CheckpointError(
            f"{UNSAFE_LOAD_VARIABLE} is set: torch would load a checkpoint's common.pt with "
            "plain pickle, which runs any code the file names; unset it to load checkpoints"
        )


def read_index(directory: str | Path) -> Metadata:
    """The checkpoint's tensor index, after checking that every file it names is whole."""
    check_safe_loading()
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(
            f"{directory}: not a Megatron-Core distributed checkpoint (no metadata.json)"
        )
    index_file = directory / ".metadata"
    if not index_file.is_file():
        raise CheckpointError(f"{index_file}: missing (the checkpoint's tensor index)")
    index = _load_index(index_file)
    needed: dict[str, int] = {}
    for item in index.storage_data.values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the index names it)")
        actual = path.stat().st_size
        if actual < size:
            raise CheckpointError(f"{path}: truncated ({actual} bytes, the index needs {size})")
    _check_common_state(directory / "common.pt")
    _check_objects(directory, index)
    return index


def _check_objects(directory: Path, index: Metadata) -> None:
    """Every pickled object the checkpoint holds is plain data (tensors, numbers, dicts).

    ``torch.distributed.checkpoint`` reads each object (Megatron's ShardedObjects: extra
    states, RNG states) with ``torch.load(weights_only=False)``, which runs whatever a
    tampered one names; here each is first read with torch's weights-only unpickler.
    """
    for item_index, item in index.storage_data.items():
        if not isinstance(index.state_dict_metadata.get(item_index.fqn), BytesStorageMetadata):
            continue
        with open(directory / item.relative_path, "rb") as file:
            file.seek(item.offset)
            data = file.read(item.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as error:  # noqa: BLE001 - whatever the refusal, nothing ran
            raise CheckpointError(
                f"{directory / item.relative_path}: refused: object {item_index.fqn!r} "
                f"{_not_plain_data(error)} (a tampered or foreign file; nothing was loaded)"
            ) from None


def _not_plain_data(error: Exception) -> str:
    """What the weights-only unpickler refused, in a few words."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return f"names {found[1]}, which a checkpoint's objects never hold"
    return f"is not plain data ({type(error).__name__})"


def _check_common_state(path: Path) -> None:
    """``common.pt`` is a torch zip archive; a cut one fails deep inside Megatron's load."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with zipfile.ZipFile(path):  # reads the central directory at the end of the file
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: truncated or damaged ({error})") from None


def _sharded_tensors(sharded_state: dict[str, Any]) -> list[ShardedTensor]:
    """Every ShardedTensor, including those a factory (e.g. SwiGLU's fc1 split) would build."""
    tensors = []
    for value in nested_values(sharded_state):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            tensors += [
                t
                for t in (nested_values(built) if isinstance(built, (dict, list)) else [built])
                if isinstance(t, ShardedTensor)
            ]
        elif isinstance(value, ShardedTensor):
            tensors.append(value)
    return tensors


def check_shapes(directory: str | Path, sharded_state: dict[str, Any], index: Metadata) -> None:
    """Collective: every tensor this model expects exists with the same global shape.

    The expectation is gathered from all ranks (each holds one stage), so a checkpoint
    with more layers or another hidden size fails on every rank with the same message.
    Vocabulary rows may differ (``allow_shape_mismatch``): padding depends on the TP size.
    """
    expected = {
        tensor.key: (tuple(tensor.global_shape), tensor.allow_shape_mismatch)
        for tensor in _sharded_tensors(sharded_state)
    }
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, expected)
    merged = {key: value for part in everyone for key, value in part.items()}
    stored = {
        key: tuple(item.size)
        for key, item in index.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    for key in sorted(merged):
        shape, rows_may_differ = merged[key]
        if key not in stored:
            raise CheckpointError(
                f"{directory}: has no tensor {key!r} (a checkpoint of "
                "another model, or saved without this state)"
            )
        saved = stored[key]
        same = (
            saved[1:] == shape[1:] and len(saved) == len(shape)
            if rows_may_differ
            else saved == shape
        )
        if not same:
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {list(saved)} in the "
                f"checkpoint but {list(shape)} in this model (another model shape)"
            )
    model_keys = {key for key in merged if not key.startswith("optimizer.")}
    extra = sorted(
        key for key in stored if key not in model_keys and not key.startswith("optimizer.")
    )
    if extra and model_keys:
        raise CheckpointError(
            f"{directory}: tensor {extra[0]!r} is not part of this model "
            f"({len(extra)} such tensors; a checkpoint of another model shape)"
        )
