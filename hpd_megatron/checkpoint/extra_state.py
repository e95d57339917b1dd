"""Transformer Engine's ``_extra_state`` entries: which a model asks for, and loading without them.

A TE module keeps its FP8 scaling state as ``_extra_state``; Megatron stores each one as a
ShardedObject, and ``dist_checkpointing.load`` fails on any object the checkpoint lacks.
Which entries a Transformer Engine model asks for, from upstream (megatron-core 0.16.1):

- ``megatron/core/models/gpt/gpt_layer_specs.py``, ``get_gpt_layer_with_transformer_engine_spec``:
  ``linear_qkv`` and ``linear_fc1`` are ``TELayerNormColumnParallelLinear`` (the input and
  pre-MLP norms fused in, as ``layer_norm_weight``), ``linear_proj`` and ``linear_fc2`` are
  ``TERowParallelLinear``, the q/k norms ``TENorm`` when ``qk_layernorm``;
- ``megatron/core/transformer/transformer_block.py``: the final norm is ``TENorm`` whenever TE
  is importable (``LayerNormImpl``), whatever the layer spec, the local one included;
- ``megatron/core/extensions/transformer_engine.py``: every TE linear's sharded state keeps
  its ``_extra_state``; ``TEDotProductAttention``'s keeps only a learnable softmax offset;
- ``megatron/core/transformer/utils.py``, ``make_sharded_object_for_checkpoint``: an object
  inside the layers has global shape ``(num_layers,)`` and offset ``(layer,)``, one outside
  them ``(1,)`` and ``(0,)``; TP rank 0 holds the main replica;
- ``megatron/core/models/common/language_module/language_module.py``: GPTModel drops
  ``output_layer._extra_state``.

Megatron's local linears keep an (empty) extra state too, but torch's norms have none: a
checkpoint written without TE (on a CPU, or by the converter before it wrote them) lacks the
norms' entries. Such entries hold no weights, so loading drops the absent ones and leaves
those modules as they were built; any other absent entry is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hpd_megatron.errors import CheckpointError
from hpd_megatron.models.description import ModelDescription

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

EXTRA_STATE = "_extra_state"
LINEARS = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
QK_NORMS = ("self_attention.q_layernorm", "self_attention.k_layernorm")
FINAL_NORM = "decoder.final_layernorm"

NO_FP8_STATE = torch.empty(0, dtype=torch.uint8)
"""What a TE module saves when it holds no FP8 state (and what the converter writes)."""


def layer_modules_with_extra_state(description: ModelDescription) -> tuple[str, ...]:
    """The modules of each decoder layer whose extra state a TE model saves and asks for."""
    return LINEARS + (QK_NORMS if description.qk_layernorm else ())


def te_extra_state_keys(description: ModelDescription) -> set[str]:
    """Every extra-state entry of a whole TE-spec model, as the checkpoint index names it."""
    layers = description.num_layers
    keys = {
        f"decoder.layers.{module}.{EXTRA_STATE}/shard_{layer}_{layers}"
        for module in layer_modules_with_extra_state(description)
        for layer in range(layers)
    }
    return keys | {f"{FINAL_NORM}.{EXTRA_STATE}/shard_0_1"}


def te_tensor_keys(description: ModelDescription) -> set[str]:
    """Every tensor of a whole TE-spec model: the TE names (``layer_norm_weight`` fused in)."""
    layer = ["self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight"]
    layer += ["self_attention.linear_qkv.bias"] if description.qkv_bias else []
    layer += ["self_attention.linear_proj.weight"]
    layer += [f"{norm}.weight" for norm in QK_NORMS] if description.qk_layernorm else []
    layer += ["mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    keys = {f"decoder.layers.{name}" for name in layer}
    keys |= {"embedding.word_embeddings.weight", f"{FINAL_NORM}.weight"}
    return keys if description.tie_word_embeddings else keys | {"output_layer.weight"}


def _objects(state: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple, Any]]:
    """(path of dict keys, ShardedObject) for every object in a nested sharded state."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    found = []
    for name, value in state.items():
        if isinstance(value, dict):
            found += _objects(value, (*path, name))
        elif isinstance(value, ShardedObject):
            found.append(((*path, name), value))
    return found


def drop_absent_extra_states(
    directory: str | Path, template: dict[str, Any], index: Metadata
) -> set[str]:
    """Collective: remove from ``template`` the extra states the checkpoint lacks.

    Returns the module state-dict names removed (for ``load_state``). Any other object the
    checkpoint lacks is one error naming it, raised on every rank alike.
    """
    stored = index.state_dict_metadata
    absent = [(path, obj) for path, obj in _objects(template) if obj.unique_key not in stored]
    others = sorted(obj.unique_key for _, obj in absent if not obj.key.endswith(EXTRA_STATE))
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, others)
    missing = sorted({key for part in everyone for key in part})
    if missing:
        raise CheckpointError(
            f"{directory}: has no entry {missing[0]!r} ({len(missing)} such entries; a "
            "checkpoint of another model, or saved without this state)"
        )
    dropped = set()
    for path, _ in absent:
        holder = template
        for name in path[:-1]:
            holder = holder[name]
        del holder[path[-1]]
        dropped.add(path[-1])
    return dropped


def load_state(
    model: torch.nn.Module, state: dict[str, Any], dropped: set[str], directory: str | Path
) -> None:
    """``model.load_state_dict``, strict except for the extra states the checkpoint lacked."""
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - dropped)
    if missing or result.unexpected_keys:
        key, what = (missing[0], "lacks") if missing else (result.unexpected_keys[0], "has")
        raise CheckpointError(
            f"{directory}: the loaded state {what} {key!r}, which this model "
            f"{'needs' if missing else 'does not have'} (a checkpoint of another model)"
        )
