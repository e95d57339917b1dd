"""Hugging Face safetensors -> Megatron-Core distributed checkpoint, streamed.

Each process writes the pieces of the TP x PP positions it owns (all of them when it is
alone): for every tensor of its pipeline stage it reads only its TP slice from the
safetensors files (``get_slice``), wraps it as a ShardedTensor with the global shape
and offset Megatron's GPTModel uses, and hands the lot to ``dist_checkpointing.save``.
No process builds a model or holds more than its shard.

The output directory ``OUT`` is itself the distributed checkpoint (loadable at any
TP/PP by ``checkpoint.weights.load_model_weights``), plus ``OUT/model.yaml`` (the
ModelDescription the trainer reads) and ``OUT/hf/`` (config.json, generation config and
tokenizer files, verbatim, for the way back). Everything is written to ``OUT.partial``
and renamed at the end; every check of the input runs before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from hpd_megatron.checkpoint.extra_state import (
    EXTRA_STATE,
    FINAL_NORM,
    NO_FP8_STATE,
    layer_modules_with_extra_state,
)
from hpd_megatron.checkpoint.publish import publish_directory
from hpd_megatron.checkpoint.run_lock import output_locked
from hpd_megatron.convert import hf_config, mapping
from hpd_megatron.data.tokenizer import Tokenizer, load_tokenizer
from hpd_megatron.errors import ConversionError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.models.dtypes import DTYPES
from hpd_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim into OUT/hf/ (the way back needs them; the trainer reads the tokenizer).
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class HFCheckpoint:
    directory: Path
    config: dict[str, Any]
    description: ModelDescription
    rows: int
    """Embedding rows in the checkpoint (config.json's vocab_size)."""
    files: dict[str, Path]
    """Tensor name -> the safetensors file holding it."""
    dtype: torch.dtype
    """The dtype config.json records (float32 when it records none)."""


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a truncated or damaged file is a ConversionError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from None


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index or the single file; never a .bin."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            files = {name: hf_dir / file for name, file in weight_map.items()}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index}: not a safetensors index ({error})") from None
        for path in set(files.values()):
            hf_config.inside_model_dir(hf_dir, path)
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise ConversionError(
                f"{index}: names shard(s) missing from {hf_dir}: {', '.join(missing)}"
            )
        return files
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as handle:
            return {name: single for name in handle.keys()}
    pickled = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise ConversionError(
            f"{hf_dir}: has only PyTorch pickle weights ({', '.join(pickled)}); safetensors are "
            "required. Convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, "
            "safe_serialization=True), then copy the tokenizer files"
        )
    raise ConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def hf_tokenizer(hf_dir: Path) -> Tokenizer | None:
    """The directory's tokenizer, when it has one."""
    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    return load_tokenizer(hf_dir)


def open_hf_checkpoint(hf_dir: str | Path) -> HFCheckpoint:
    """Read config.json, the tokenizer's size and the safetensors headers; check every shape."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: no such directory")
    for name in (*HF_SIDE_FILES, INDEX_FILE, SINGLE_FILE):
        if (hf_dir / name).exists():
            hf_config.inside_model_dir(hf_dir, hf_dir / name)
    config = hf_config.read_config(hf_dir)
    where = str(hf_dir / "config.json")
    tokenizer = hf_tokenizer(hf_dir)
    description = hf_config.description_from_hf(
        config, tokenizer.vocab_size if tokenizer else None, where
    )
    if tokenizer is not None:
        # The trainer compares it with the other model's and the data's (inputs.py).
        description.extra["tokenizer_fingerprint"] = tokenizer.fingerprint()
    rows = int(config["vocab_size"])
    if description.vocab_size > rows:
        raise ConversionError(
            f"{hf_dir}: the tokenizer has {description.vocab_size} tokens but {where} has only "
            f"vocab_size={rows} embedding rows"
        )
    files = weight_files(hf_dir)
    expected = mapping.hf_shapes(description, rows)
    for name in expected:
        if name not in files:
            raise ConversionError(
                f"{hf_dir}: tensor {name} is missing (a {description.family} "
                f"model with this config.json has it)"
            )
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with open_safetensors(path) as handle:
            for name in names:
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq") or (
                        name == "lm_head.weight" and description.tie_word_embeddings
                    ):
                        continue  # recomputed / the tied copy of the embedding
                    raise ConversionError(
                        f"{path}: unexpected tensor {name} for a "
                        f"{description.family} model with this config.json"
                    )
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ConversionError(
                        f"{path}: tensor {name} has shape {list(shape)} but {where} implies "
                        f"{list(expected[name])}"
                    )
    return HFCheckpoint(
        hf_dir, config, description, rows, files, hf_config.config_dtype(config) or torch.float32
    )


def check_layout(description: ModelDescription, tp: int, pp: int) -> None:
    try:
        validate_layout(ParallelLayout(tp, pp), tp * pp, [("model", description)])
    except LayoutError as error:
        raise ConversionError(f"--tp {tp} --pp {pp}: {error}") from None


def resolve_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in DTYPES:
        raise ConversionError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


class SliceReader:
    """Reads one slice of one tensor; the file is mapped only for that read."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype) -> None:
        self.files = files
        self.dtype = dtype
        self.bytes_read = 0

    def __call__(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        # Opening per read unmaps the file afterwards, so pages of a column slice
        # (which touch every row) do not accumulate in this process's memory.
        with open_safetensors(self.files[name]) as handle:
            data = handle.get_slice(name)[slices]
        self.bytes_read += data.numel() * data.element_size()
        return data.to(self.dtype).contiguous()


def stage_layers(description: ModelDescription, pp: int, pp_rank: int) -> range:
    per_stage = description.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def positions_of_rank(tp: int, pp: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(tp_rank, pp_rank) positions this process writes (Megatron's order: TP fastest)."""
    if world_size == 1:
        return [(t, p) for p in range(pp) for t in range(tp)]
    return [(rank % tp, rank // tp)]


def position_entries(
    description: ModelDescription, rows: int, pp: int, pp_rank: int
) -> list[mapping.Entry]:
    entries = mapping.embedding_entries(description, rows) if pp_rank == 0 else []
    for layer in stage_layers(description, pp, pp_rank):
        entries += mapping.layer_entries(description, layer)
    if pp_rank == pp - 1:
        entries += mapping.final_entries(description, rows)
    return entries


def sharded_tensor(entry: mapping.Entry, piece: mapping.Piece, num_layers: int):
    """The ShardedTensor of ``piece`` with the key, global shape and offset GPTModel uses."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    shape, offset, fragmentations = entry.shape, piece.offset, piece.fragmentations
    prepend = 0
    if entry.layer is not None:
        shape, offset, prepend = (num_layers, *shape), (entry.layer, *offset), 1
        fragmentations = None if fragmentations is None else (num_layers, *fragmentations)
    return ShardedTensor(
        key=entry.key,
        data=piece.data,
        dtype=piece.data.dtype,
        local_shape=tuple(piece.data.shape),
        global_shape=tuple(shape),
        global_offset=tuple(offset),
        axis_fragmentations=fragmentations,
        replica_id=0,
        prepend_axis_num=prepend,
        # Megatron's own vocab tensors allow it: a model padded for any TP loads the rows.
        allow_shape_mismatch=entry.kind == mapping.VOCAB,
    )


def build_sharded_state(
    source: HFCheckpoint,
    positions: list[tuple[int, int]],
    tp: int,
    pp: int,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[dict[str, Any], SliceReader]:
    """This process's pieces, read from the safetensors files."""
    from tqdm import tqdm

    description = source.description
    reader = SliceReader(source.files, dtype)
    work = []
    for tp_rank, pp_rank in positions:
        for entry in position_entries(description, source.rows, pp, pp_rank):
            # Replicated tensors are written once, by TP rank 0 (the main replica).
            if entry.kind != mapping.REPLICATED or tp_rank == 0:
                work.append((tp_rank, entry))
    total = sum(_piece_bytes(entry, tp, dtype) for _, entry in work)
    state: dict[str, Any] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="reading safetensors slices",
        disable=not progress,
    ) as bar:
        for tp_rank, entry in work:
            for index, piece in enumerate(
                mapping.tp_pieces(entry, description, tp_rank, tp, reader)
            ):
                state[f"{entry.key}/{entry.layer}/{tp_rank}/{index}"] = sharded_tensor(
                    entry, piece, description.num_layers
                )
                bar.update(piece.data.numel() * piece.data.element_size())
    for tp_rank, pp_rank in positions:
        if tp_rank == 0:  # the main replica of every extra state
            state.update(extra_states(description, pp, pp_rank))
    return state, reader


def extra_states(description: ModelDescription, pp: int, pp_rank: int) -> dict[str, Any]:
    """The ``_extra_state`` objects of a pipeline stage, empty as TE saves them without FP8.

    Written for every module whose extra state a Transformer Engine model asks for (the
    linears, the q/k norms, the final norm: ``checkpoint.extra_state``), so that the output
    loads into either spec as it is.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layers = description.num_layers
    state = {}
    for layer in stage_layers(description, pp, pp_rank):
        for module in layer_modules_with_extra_state(description):
            key = f"decoder.layers.{module}.{EXTRA_STATE}"
            state[f"{key}/{layer}"] = ShardedObject(key, NO_FP8_STATE, (layers,), (layer,), 0)
    if pp_rank == pp - 1:
        key = f"{FINAL_NORM}.{EXTRA_STATE}"
        state[key] = ShardedObject(key, NO_FP8_STATE, (1,), (0,), replica_id=0)
    return state


def _piece_bytes(entry: mapping.Entry, tp: int, dtype: torch.dtype) -> int:
    numel = 1
    for size in entry.shape:
        numel *= size
    share = 1 if entry.kind == mapping.REPLICATED else tp
    return numel // share * torch.empty((), dtype=dtype).element_size()


def write_side_files(source: HFCheckpoint, directory: Path) -> None:
    """model.yaml and hf/ (rank 0, after the weights)."""
    (directory / "model.yaml").write_text(
        yaml.safe_dump(source.description.to_dict(), sort_keys=False)
    )
    side = directory / "hf"
    side.mkdir()
    for name in HF_SIDE_FILES:
        if (source.directory / name).is_file():
            shutil.copy2(source.directory / name, side / name)


def convert(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    progress: bool = True,
    before_save: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Collective (every process of the launch calls it) HF -> Megatron conversion.

    torch.distributed must be initialised (see launch.conversion_processes). Returns
    per-process statistics: bytes read, shard bytes and the positions written.
    ``before_save`` is called once this process holds all its pieces, just before the
    save (the benchmark measures memory there).
    """
    import torch.distributed as dist

    out = Path(out)
    source = open_hf_checkpoint(hf_dir)
    check_layout(source.description, tp, pp)
    target_dtype = resolve_dtype(dtype, source.dtype)
    if out.exists():
        raise ConversionError(f"{out}: already exists; remove it or choose another --out")

    rank, world = dist.get_rank(), dist.get_world_size()
    if world not in (1, tp * pp):
        raise ConversionError(f"launched with {world} processes; use 1 or TP x PP = {tp * pp}")
    with output_locked(out), publish_directory(out, what="the converted checkpoint") as partial:
        positions = positions_of_rank(tp, pp, rank, world)
        state, reader = build_sharded_state(
            source, positions, tp, pp, target_dtype, progress and rank == 0
        )
        if before_save is not None:
            before_save()
        stats = save_state(state, partial, progress and rank == 0)
        del state
        if rank == 0:
            write_side_files(source, partial)
    return {
        "rank": rank,
        "positions": positions,
        "bytes_read": reader.bytes_read,
        **stats,
        "dtype": hf_config.hf_dtype_name(target_dtype),
    }


def save_state(state: dict[str, Any], directory: Path, progress: bool) -> dict[str, int]:
    """Collective ``dist_checkpointing`` save of every process's pieces; returns this
    process's shard bytes."""
    from hpd_megatron.checkpoint.dist_save import save_sharded

    if progress:
        print(f"writing the distributed checkpoint to {directory}", flush=True)
    save_sharded(state, str(directory))
    shard_bytes = sum(
        t.data.numel() * t.data.element_size()
        for t in state.values()
        if hasattr(t, "global_shape") and t.data is not None
    )
    return {"shard_bytes": shard_bytes}


def read_output_description(out: str | Path) -> ModelDescription:
    """The description a converted directory carries."""
    return ModelDescription.from_yaml(Path(out) / "model.yaml")
