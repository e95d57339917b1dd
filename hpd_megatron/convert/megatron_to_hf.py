"""Megatron-Core distributed checkpoint (any TP/PP) -> Hugging Face safetensors, streamed.

The input is a directory that is a dist checkpoint with ``model.yaml`` next to it (what
``hf_to_megatron`` and the trainer's export write) and, optionally, ``hf/`` with the
original config.json, generation config and tokenizer; without ``hf/`` config.json is
synthesised from the description.

Work is cut into units (the embedding, each decoder layer, the final norm and output
layer) dealt round-robin to the processes. In each round every process loads the whole
tensors of its unit (dist_checkpointing reads the pieces from whatever layout wrote
them), turns them into Hugging Face tensors and appends them to its current
safetensors file, which it closes once it reaches ``--shard-size``. So a process holds
at most one file's worth plus one layer. Rank 0 then names the files
``model-0000i-of-0000N.safetensors`` in model order and writes the index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpd_megatron.checkpoint.publish import publish_directory
from hpd_megatron.checkpoint.run_lock import output_locked
from hpd_megatron.convert import hf_config, mapping
from hpd_megatron.convert.hf_to_megatron import HF_SIDE_FILES, INDEX_FILE, SINGLE_FILE
from hpd_megatron.errors import ConfigError, ConversionError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.models.dtypes import DTYPES

# Fields both a description and config.json define; they must agree.
_CHECKED_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "tie_word_embeddings",
    "qkv_bias",
    "qk_layernorm",
    "rotary_base",
    "rope_scaling",
    "norm_epsilon",
)
_UNITS = {
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "B": 1,
}


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MiB' (2^20), or a number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    if not match or (match.group(2) and match.group(2) not in _UNITS):
        raise ConversionError(f"--shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS.get(match.group(2) or "B", 1))


def read_description(ckpt: Path, model_yaml: str | Path | None) -> ModelDescription:
    path = Path(model_yaml) if model_yaml else ckpt / "model.yaml"
    if not path.is_file():
        raise ConversionError(f"{ckpt}: no model.yaml next to the checkpoint; pass --model YAML")
    try:
        return ModelDescription.from_yaml(path)
    except ConfigError as error:
        raise ConversionError(f"{path}: {error}") from None


def target_config(ckpt: Path, description: ModelDescription) -> dict[str, Any]:
    """config.json from ``hf/`` when present (checked against the description), else synthesised."""
    side = ckpt / "hf" / "config.json"
    if not side.is_file():
        return hf_config.hf_config_from_description(description)
    config = hf_config.read_config(side.parent)
    other = hf_config.description_from_hf(config, description.vocab_size, str(side))
    for name in _CHECKED_FIELDS:
        if getattr(other, name) != getattr(description, name):
            raise ConversionError(
                f"{side}: {name} is {getattr(other, name)!r} but the checkpoint's model "
                f"description has {getattr(description, name)!r}"
            )
    return config


def stored_dtypes(ckpt: Path) -> dict[str, torch.dtype]:
    """Key -> dtype of each tensor in the checkpoint (from its metadata, no data read).

    Read through ``read_index``'s restricted unpickler: ``.metadata`` is a pickle.
    """
    from hpd_megatron.checkpoint.verify import read_index

    metadata = read_index(ckpt)
    return {
        key: value.properties.dtype
        for key, value in metadata.state_dict_metadata.items()
        if hasattr(value, "properties")
    }


def units(description: ModelDescription, rows: int) -> list[list[mapping.Entry]]:
    """The work, in Hugging Face file order: embedding, each layer, final norm + output layer."""
    return (
        [mapping.embedding_entries(description, rows)]
        + [mapping.layer_entries(description, layer) for layer in range(description.num_layers)]
        + [mapping.final_entries(description, rows)]
    )


def request(entry: mapping.Entry, num_layers: int, dtype: torch.dtype):
    """A ShardedTensor asking for the whole of ``entry`` (one layer of it for decoder tensors).

    The layer is asked for as a (1, ...) block of the (num_layers, ...) tensor on an
    irregular grid: on a regular one dist_checkpointing expects every layer to be asked for.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if entry.layer is not None:
        data = torch.empty((1, *entry.shape), dtype=dtype)
        return ShardedTensor(
            key=entry.key,
            data=data,
            dtype=dtype,
            local_shape=tuple(data.shape),
            global_shape=(num_layers, *entry.shape),
            global_offset=(entry.layer,) + (0,) * len(entry.shape),
            axis_fragmentations=None,
        )
    # Vocab tensors: exactly config.json's rows; rows the checkpoint lacks stay zero.
    return ShardedTensor.from_rank_offsets(
        entry.key,
        torch.zeros(entry.shape, dtype=dtype),
        allow_shape_mismatch=entry.kind == mapping.VOCAB,
    )


class ShardWriter:
    """Appends tensors to this process's current safetensors file; closes it at the size limit."""

    def __init__(self, directory: Path, rank: int, limit: int) -> None:
        self.directory, self.rank, self.limit = directory, rank, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[dict[str, Any]] = []

    def add(self, order: int, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        if not self.pending:
            self.order = order
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"rank{self.rank:05d}-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.written.append(
            {
                "file": name,
                "order": self.order,
                "names": list(self.pending),
                "bytes": self.pending_bytes,
            }
        )
        self.pending, self.pending_bytes = {}, 0


def _name_files(directory: Path, written: list[dict[str, Any]]) -> None:
    """Rank 0: final file names in model order, and the index when there are several."""
    written = sorted(written, key=lambda item: item["order"])
    total = sum(item["bytes"] for item in written)
    weight_map = {}
    for number, item in enumerate(written, start=1):
        final = (
            SINGLE_FILE
            if len(written) == 1
            else f"model-{number:05d}-of-{len(written):05d}.safetensors"
        )
        os.replace(directory / item["file"], directory / final)
        weight_map.update({name: final for name in item["names"]})
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_side_files(
    ckpt: Path, directory: Path, config: dict[str, Any], description: ModelDescription
) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    side = ckpt / "hf"
    for name in HF_SIDE_FILES:
        if name != "config.json" and (side / name).is_file():
            shutil.copy2(side / name, directory / name)
    if not (directory / "generation_config.json").exists():
        extra = description.extra or {}
        generation = {
            key: extra.get(key)
            for key in ("bos_token_id", "eos_token_id")
            if extra.get(key) is not None
        }
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@dataclass
class Plan:
    ckpt: Path
    out: Path
    description: ModelDescription
    config: dict[str, Any]
    work: list[list[mapping.Entry]]
    stored: dict[str, torch.dtype]
    out_dtype: torch.dtype
    limit: int


def plan(
    ckpt: str | Path,
    out: str | Path,
    model_yaml: str | Path | None = None,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
) -> Plan:
    """Every check of the input, before anything is written (no process group needed)."""
    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "metadata.json").is_file():
        raise ConversionError(
            f"{ckpt}: not a Megatron-Core distributed checkpoint (no metadata.json)"
        )
    # The index first: nothing else of the checkpoint is read before it is checked.
    stored = stored_dtypes(ckpt)
    description = read_description(ckpt, model_yaml)
    config = target_config(ckpt, description)
    rows = int(config["vocab_size"])
    limit = parse_size(shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists():
        raise ConversionError(f"{out}: already exists; remove it or choose another --out")
    work = units(description, rows)
    for entries in work:
        for entry in entries:
            if entry.key not in stored:
                raise ConversionError(
                    f"{ckpt}: tensor {entry.key} is missing (the model description "
                    f"says a {description.family} model has it)"
                )
    # Default: the dtype the original config.json names (hf/), else the checkpoint's own.
    recorded = hf_config.config_dtype(config) if (ckpt / "hf" / "config.json").is_file() else None
    out_dtype = DTYPES[dtype] if dtype else (recorded or stored[work[0][0].key])
    config = dict(config)
    config["dtype" if "dtype" in config else "torch_dtype"] = hf_config.hf_dtype_name(out_dtype)
    return Plan(ckpt, out, description, config, work, stored, out_dtype, limit)


def convert(
    ckpt: str | Path,
    out: str | Path,
    model_yaml: str | Path | None = None,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collective (every process of the launch calls it) Megatron -> HF conversion."""
    import torch.distributed as dist
    from tqdm import tqdm

    p = plan(ckpt, out, model_yaml, shard_size, dtype)
    rank, world = dist.get_rank(), dist.get_world_size()
    with output_locked(p.out), publish_directory(p.out, what="the HF model") as partial:
        writer = ShardWriter(partial, rank, p.limit)
        rounds = -(-len(p.work) // world)
        with tqdm(
            total=len(p.work),
            unit="unit",
            desc="writing safetensors",
            disable=not (progress and rank == 0),
        ) as bar:
            for round_index in range(rounds):
                order = round_index * world + rank
                tensors = hf_unit(p, p.work[order] if order < len(p.work) else [], world)
                if tensors:
                    writer.add(order, tensors)
                bar.update(min(world, len(p.work) - round_index * world))
        writer.flush()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, writer.written)
        if rank == 0:
            _name_files(partial, [item for items in gathered for item in items])
            _write_side_files(p.ckpt, partial, p.config, p.description)
    return {"rank": rank, "files": writer.written, "dtype": hf_config.hf_dtype_name(p.out_dtype)}


def hf_unit(p: Plan, entries: list[mapping.Entry], world: int) -> dict[str, torch.Tensor]:
    """Collective: one unit's whole tensors, loaded from the checkpoint, as Hugging Face
    tensors of the output dtype (none for a process without a unit this round)."""
    from megatron.core import dist_checkpointing

    state = {
        f"{e.key}/{e.layer}": request(e, p.description.num_layers, p.stored[e.key]) for e in entries
    }
    # Collective: processes without a unit this round load nothing.
    loaded = (
        dist_checkpointing.load(state, str(p.ckpt), validate_access_integrity=False)
        if world > 1 or state
        else {}
    )
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        full = loaded[f"{entry.key}/{entry.layer}"]
        if entry.layer is not None:
            full = full[0]
        for name, tensor in mapping.hf_tensors(entry, p.description, full).items():
            tensors[name] = tensor.to(p.out_dtype).contiguous()
    return tensors
