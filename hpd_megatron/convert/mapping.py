"""Which Hugging Face tensors, sliced how, make each Megatron-Core checkpoint tensor.

A Megatron-Core distributed checkpoint stores every tensor with its *global* shape;
decoder tensors gain a leading layer axis (key ``decoder.layers.<name>``, global shape
``(num_layers, *shape)``). The global layouts that differ from Hugging Face's:

* ``linear_qkv``: rows grouped per KV group, ``[q heads of group 0, k_0, v_0, q heads of
  group 1, k_1, v_1, ...]`` (biases the same way). TP ranks hold whole groups, so a TP
  rank's rows come from one contiguous row range of each of q_proj, k_proj, v_proj.
* ``linear_fc1``: ``[gate; up]``. Each TP rank's module holds ``[gate_r; up_r]`` (each
  half split across TP before concatenation); Megatron's SwiGLU sharded-tensor factory
  stores those as two pieces of the global ``[gate; up]``, which is what we write.
* ``linear_proj`` / ``linear_fc2``: split across TP along the input (column) axis.
* word embedding / output layer: split across TP along rows. The checkpoint keeps all of
  Hugging Face's rows; Megatron's model pads to a multiple of 128 x TP and loads the
  overlapping rows (its ShardedTensors allow a shape mismatch), zero-filling the rest.
* Norm weights are replicated. Their keys are the Transformer Engine spec's names
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``): TE fuses the
  pre-attention and pre-MLP norms into those linears, and Megatron's local spec maps its
  ``input_layernorm`` / ``pre_mlp_layernorm`` to the same keys, so one checkpoint serves
  both specs (``module_parameter_name`` gives each spec's module names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpd_megatron.models.description import ModelDescription

# How a tensor is divided across TP ranks.
REPLICATED, QKV, ROW_SPLIT_INPUT, FC1, VOCAB = "replicated", "qkv", "input_split", "fc1", "vocab"

# Reads ``name`` restricted to one slice per leading axis; only that part is loaded.
SliceReader = Callable[[str, tuple[slice, ...]], torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """One Megatron checkpoint tensor; for decoder tensors, one layer of it."""

    key: str
    layer: int | None
    kind: str
    hf_names: tuple[str, ...]
    shape: tuple[int, ...]
    """Global shape, without the layer axis."""


@dataclass(frozen=True)
class Piece:
    """The part of an Entry that one TP rank writes."""

    data: torch.Tensor
    offset: tuple[int, ...]
    fragmentations: tuple[int, ...] | None
    """Pieces per axis on a regular grid; None when the pieces are unequal (vocab rows)."""


def _qkv_rows(d: ModelDescription) -> int:
    return d.num_query_groups * (d.num_attention_heads // d.num_query_groups + 2) * d.kv_channels


def embedding_entries(d: ModelDescription, rows: int) -> list[Entry]:
    return [
        Entry(
            "embedding.word_embeddings.weight",
            None,
            VOCAB,
            ("model.embed_tokens.weight",),
            (rows, d.hidden_size),
        )
    ]


def layer_entries(d: ModelDescription, layer: int) -> list[Entry]:
    return _attention_entries(d, layer) + _mlp_entries(d, layer)


def _attention_entries(d: ModelDescription, layer: int) -> list[Entry]:
    hf = f"model.layers.{layer}."
    attention = [hf + f"self_attn.{p}_proj" for p in "qkv"]
    entries = [
        Entry(
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            layer,
            REPLICATED,
            (hf + "input_layernorm.weight",),
            (d.hidden_size,),
        ),
        Entry(
            "decoder.layers.self_attention.linear_qkv.weight",
            layer,
            QKV,
            tuple(n + ".weight" for n in attention),
            (_qkv_rows(d), d.hidden_size),
        ),
    ]
    if d.qkv_bias:
        entries.append(
            Entry(
                "decoder.layers.self_attention.linear_qkv.bias",
                layer,
                QKV,
                tuple(n + ".bias" for n in attention),
                (_qkv_rows(d),),
            )
        )
    if d.qk_layernorm:
        for which in "qk":
            entries.append(
                Entry(
                    f"decoder.layers.self_attention.{which}_layernorm.weight",
                    layer,
                    REPLICATED,
                    (hf + f"self_attn.{which}_norm.weight",),
                    (d.kv_channels,),
                )
            )
    entries.append(
        Entry(
            "decoder.layers.self_attention.linear_proj.weight",
            layer,
            ROW_SPLIT_INPUT,
            (hf + "self_attn.o_proj.weight",),
            (d.hidden_size, d.num_attention_heads * d.kv_channels),
        )
    )
    return entries


def _mlp_entries(d: ModelDescription, layer: int) -> list[Entry]:
    hf = f"model.layers.{layer}."
    return [
        Entry(
            "decoder.layers.mlp.linear_fc1.layer_norm_weight",
            layer,
            REPLICATED,
            (hf + "post_attention_layernorm.weight",),
            (d.hidden_size,),
        ),
        Entry(
            "decoder.layers.mlp.linear_fc1.weight",
            layer,
            FC1,
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
            (2 * d.ffn_hidden_size, d.hidden_size),
        ),
        Entry(
            "decoder.layers.mlp.linear_fc2.weight",
            layer,
            ROW_SPLIT_INPUT,
            (hf + "mlp.down_proj.weight",),
            (d.hidden_size, d.ffn_hidden_size),
        ),
    ]


def final_entries(d: ModelDescription, rows: int) -> list[Entry]:
    entries = [
        Entry(
            "decoder.final_layernorm.weight",
            None,
            REPLICATED,
            ("model.norm.weight",),
            (d.hidden_size,),
        )
    ]
    if not d.tie_word_embeddings:
        # Tied models have no lm_head (transformers drops it on save) and Megatron's
        # output layer reads the embedding's key.
        entries.append(
            Entry("output_layer.weight", None, VOCAB, ("lm_head.weight",), (rows, d.hidden_size))
        )
    return entries


def all_entries(d: ModelDescription, rows: int) -> list[Entry]:
    entries = embedding_entries(d, rows)
    for layer in range(d.num_layers):
        entries += layer_entries(d, layer)
    return entries + final_entries(d, rows)


def hf_shapes(d: ModelDescription, rows: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``d`` holds, with its shape."""
    q, kv = d.num_attention_heads * d.kv_channels, d.num_query_groups * d.kv_channels
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (rows, d.hidden_size),
        "model.norm.weight": (d.hidden_size,),
    }
    if not d.tie_word_embeddings:
        shapes["lm_head.weight"] = (rows, d.hidden_size)
    for layer in range(d.num_layers):
        hf = f"model.layers.{layer}."
        shapes.update(
            {
                hf + "input_layernorm.weight": (d.hidden_size,),
                hf + "post_attention_layernorm.weight": (d.hidden_size,),
                hf + "self_attn.q_proj.weight": (q, d.hidden_size),
                hf + "self_attn.k_proj.weight": (kv, d.hidden_size),
                hf + "self_attn.v_proj.weight": (kv, d.hidden_size),
                hf + "self_attn.o_proj.weight": (d.hidden_size, q),
                hf + "mlp.gate_proj.weight": (d.ffn_hidden_size, d.hidden_size),
                hf + "mlp.up_proj.weight": (d.ffn_hidden_size, d.hidden_size),
                hf + "mlp.down_proj.weight": (d.hidden_size, d.ffn_hidden_size),
            }
        )
        if d.qkv_bias:
            shapes.update(
                {
                    hf + "self_attn.q_proj.bias": (q,),
                    hf + "self_attn.k_proj.bias": (kv,),
                    hf + "self_attn.v_proj.bias": (kv,),
                }
            )
        if d.qk_layernorm:
            shapes.update(
                {
                    hf + "self_attn.q_norm.weight": (d.kv_channels,),
                    hf + "self_attn.k_norm.weight": (d.kv_channels,),
                }
            )
    return shapes


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows of q, k, v (``groups`` KV groups each) -> Megatron's per-group [q..., k, v] rows."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, d: ModelDescription
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv`` for the whole tensor."""
    groups, per_group = d.num_query_groups, d.num_attention_heads // d.num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, per_group + 2, d.kv_channels, *rest)
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _split(size: int, parts: int, index: int) -> tuple[int, int]:
    """Start and end of piece ``index`` of ``size`` split into ``parts`` near-equal runs."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def tp_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    """What TP rank ``tp_rank`` of ``tp_size`` writes for ``entry``, read slice by slice."""
    pieces = {
        REPLICATED: _replicated_pieces,
        QKV: _qkv_pieces,
        ROW_SPLIT_INPUT: _input_split_pieces,
        FC1: _fc1_pieces,
        VOCAB: _vocab_pieces,
    }.get(entry.kind)
    if pieces is None:
        raise ValueError(f"unknown tensor kind {entry.kind!r}")
    return pieces(entry, d, tp_rank, tp_size, read)


def _replicated_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    dims = len(entry.shape)
    return [Piece(read(entry.hf_names[0], (slice(None),)), (0,) * dims, (1,) * dims)]


def _qkv_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    groups = d.num_query_groups // tp_size
    first = tp_rank * groups
    per_group = d.num_attention_heads // d.num_query_groups
    q_rows = groups * per_group * d.kv_channels
    kv_rows = groups * d.kv_channels
    q_start = first * per_group * d.kv_channels
    q = read(entry.hf_names[0], (slice(q_start, q_start + q_rows),))
    k, v = (
        read(name, (slice(first * d.kv_channels, first * d.kv_channels + kv_rows),))
        for name in entry.hf_names[1:]
    )
    data = interleave_qkv(q, k, v, groups)
    rest = len(entry.shape) - 1
    return [Piece(data, (tp_rank * data.shape[0],) + (0,) * rest, (tp_size,) + (1,) * rest)]


def _input_split_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    columns = entry.shape[1] // tp_size
    data = read(entry.hf_names[0], (slice(None), slice(tp_rank * columns, (tp_rank + 1) * columns)))
    return [Piece(data.contiguous(), (0, tp_rank * columns), (1, tp_size))]


def _fc1_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    # Global [gate; up]: gate's TP piece r is piece r of 2T, up's is piece T + r.
    rows = d.ffn_hidden_size // tp_size
    pieces = []
    for half, name in enumerate(entry.hf_names):
        data = read(name, (slice(tp_rank * rows, (tp_rank + 1) * rows),))
        pieces.append(Piece(data, ((half * tp_size + tp_rank) * rows, 0), (2 * tp_size, 1)))
    return pieces


def _vocab_pieces(
    entry: Entry, d: ModelDescription, tp_rank: int, tp_size: int, read: SliceReader
) -> list[Piece]:
    rows = entry.shape[0]
    start, end = _split(rows, tp_size, tp_rank)
    if start == end:
        return []
    data = read(entry.hf_names[0], (slice(start, end),))
    regular = rows % tp_size == 0
    return [Piece(data, (start, 0), (tp_size, 1) if regular else None)]


def hf_tensors(entry: Entry, d: ModelDescription, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of ``entry`` from its whole (global, one-layer) tensor."""
    if entry.kind == QKV:
        return dict(zip(entry.hf_names, split_qkv(full, d)))
    if entry.kind == FC1:
        gate, up = full.chunk(2, dim=0)
        return {entry.hf_names[0]: gate.contiguous(), entry.hf_names[1]: up.contiguous()}
    return {entry.hf_names[0]: full}


# Local spec module names whose checkpoint keys (and TE module names) differ.
_LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def module_parameter_name(entry: Entry, spec: str = "local") -> str:
    """The parameter's name in a full GPTModel's state_dict for the ``local`` or ``te`` spec."""
    if spec not in ("local", "te"):
        raise ValueError(f"spec must be 'local' or 'te', got {spec!r}")
    if entry.layer is None:
        return entry.key
    name = entry.key[len("decoder.layers.") :]
    if spec == "local":
        name = {te: local for local, te in _LOCAL_TO_TE.items()}.get(name, name)
    return f"decoder.layers.{entry.layer}.{name}"
