"""Check a distributed checkpoint before loading it, so that damage is reported by name.

``torch.distributed.checkpoint`` fails deep inside a read plan on a truncated file or a
tensor of another shape, with a message that names neither the file nor the model
field. Both checks here are cheap (the ``.metadata`` index and file sizes, no tensor
data) and every rank reaches the same verdict, so all ranks raise together instead of
leaving the others blocked in a collective.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from hpd_megatron.errors import CheckpointError


def read_index(directory: str | Path) -> Metadata:
    """The checkpoint's tensor index, after checking that every file it names is whole."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(
            f"{directory}: not a Megatron-Core distributed checkpoint (no metadata.json)"
        )
    index_file = directory / ".metadata"
    if not index_file.is_file():
        raise CheckpointError(f"{index_file}: missing (the checkpoint's tensor index)")
    try:
        index = FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(
            f"{index_file}: unreadable ({type(error).__name__}: {error})"
        ) from None
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
    if not (directory / "common.pt").is_file():
        raise CheckpointError(f"{directory / 'common.pt'}: missing")
    return index


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
