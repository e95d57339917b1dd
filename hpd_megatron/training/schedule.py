"""Micro-batches through Megatron-Core's pipeline schedules.

``run_schedule`` is the one place the project calls ``get_forward_backward_func``: it
feeds a list of micro-batches to whichever schedule the PP size selects and returns
what the last stage's loss function reported for each micro-batch (empty on other
stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from hpd_megatron.errors import ConfigError
from hpd_megatron.parallel.placement import to_device

Batch = dict[str, torch.Tensor]
HOST_FIELDS = ("sample_index",)
"""Batch fields that stay on the host: HPD's seeds are computed from the sample indices
there, and nothing on the device reads them."""
# Given a model stage and a micro-batch: the stage's output and, for the last stage,
# the function that turns that output into (loss, [num_tokens,] report).
ForwardStep = Callable[
    [torch.nn.Module, Batch], tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]
]


def causal_lm_forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """One GPTModel stage on a micro-batch of ``tokens`` and ``position_ids``.

    The first stage reads the tokens; later stages take their input from the
    schedule's p2p receive (set_input_tensor), and the tokens are ignored there. A packed
    batch (``segment_ids``) keeps its records apart on every stage (``attention_inputs``).
    """
    attention = attention_inputs(model, batch)
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"], **attention)


def causal_lm_hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The last stage's final hidden states [s, b, h] (after the final norm; [s/TP, b, h]
    under sequence parallelism), the output layer left to a fused head and loss.

    GPTModel's ``_postprocess`` returns the decoder's output before the output layer when
    ``post_process`` is off; the decoder's own flag, which applies the final norm, is
    separate and stays on.
    """
    gpt = unwrap_model(model)
    gpt.post_process = False
    try:
        return causal_lm_forward(model, batch)
    finally:
        gpt.post_process = True


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The last stage's output-layer shard [V/TP, h] (the shared embedding when tied), the
    parameter itself, so that its gradient reaches DDP's hooks."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def attention_inputs(model: torch.nn.Module, batch: Batch) -> dict[str, Any]:
    """The forward arguments that confine each position to its own record.

    Megatron-Core's local attention takes a mask; Transformer Engine's takes THD
    ``PackedSeqParams``, whose ``cu_seqlens`` also restart RoPE per record. On the local
    spec RoPE runs on across the sample, which is exact up to rounding: a rotary score
    depends on the difference of two positions only, and both lie in the same record.
    Unpacked, the causal spec builds its own mask and none is passed.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    core = unwrap_model(model).decoder.layers[0].self_attention.core_attention
    local = isinstance(core, DotProductAttention)
    causal_spec = core.attn_mask_type == AttnMaskType.causal
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        if not local or causal_spec:
            return {"attention_mask": None}
        # A packed spec's local attention applies only the mask it is given: one segment.
        segment_ids = torch.zeros_like(batch["tokens"])
    if not local:
        return {"attention_mask": None, "packed_seq_params": thd_packed_seq_params(segment_ids)}
    if causal_spec and core.config.masked_softmax_fusion:
        # The fused causal softmax ignores any mask: records would see each other.
        raise ConfigError(
            "data.pack: the model was built with a causal local layer spec and a fused "
            "softmax, which ignores the packed mask; build it with layer_spec(..., packed=True)"
        )
    return {"attention_mask": block_causal_mask(segment_ids)}


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where a query may NOT attend a key (Megatron's convention):
    keys later than the query, or in another segment."""
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def thd_packed_seq_params(segment_ids: torch.Tensor) -> Any:
    """THD ``PackedSeqParams`` of one packed sample (GPU, Transformer Engine spec).

    Follows upstream's ``forward_step`` in pretrain_gpt.py: cu_seqlens (int32, from 0 to
    the sample's length) are the segment boundaries, the padding being the last segment;
    no record is padded for context parallelism (refused), so the padded cu_seqlens are
    the same tensor. THD attention squeezes the batch dimension: one sample per micro-batch.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.shape[0] != 1:
        raise ConfigError(
            "schedule.micro_batch_size: packed data on the Transformer Engine spec takes one "
            f"sample per micro-batch (THD attention), got {segment_ids.shape[0]}"
        )
    segments = segment_ids[0]
    starts = torch.nonzero(segments[1:] != segments[:-1]).flatten() + 1
    ends = torch.tensor([0, len(segments)], device=segments.device)
    cu_seqlens = torch.cat([ends[:1], starts, ends[1:]]).to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP (or other ``.module``) wrapper."""
    while hasattr(module, "module"):
        module = module.module
    return module


def batch_to_device(batch: Batch, device: torch.device | None = None) -> Batch:
    """The micro-batch on the model's device (the current one by default), but for
    ``HOST_FIELDS``."""
    return {
        name: value if name in HOST_FIELDS else to_device(value, device)
        for name, value in batch.items()
    }


def placed_forward_step(
    forward_step: ForwardStep,
) -> Callable[[Iterator[Batch], torch.nn.Module], tuple]:
    """The function Megatron's schedule calls: the next micro-batch, moved onto the
    device, through ``forward_step``. Moving one micro-batch at a time, inside the step,
    is what upstream's ``forward_step`` does with ``get_batch``."""

    def forward_step_func(data_iterator: Iterator[Batch], stage: torch.nn.Module) -> tuple:
        return forward_step(stage, batch_to_device(next(data_iterator)))

    return forward_step_func


def run_schedule(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    forward_step: ForwardStep,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    adjust_tensor_shapes_fn: Callable[[list, list], tuple[list, list]] | None = None,
) -> list[Any]:
    """Forward (and backward unless ``forward_only``) of every micro-batch, each moved
    onto the current device as the schedule reaches it.

    Returns the loss functions' reports, in micro-batch order, on the last pipeline
    stage; an empty list elsewhere. Gradients accumulate into the parameters (or the
    DDP buffers when the model is wrapped). ``adjust_tensor_shapes_fn`` widens the
    tensors passed between pipeline stages (the teacher's hidden state rides along);
    it is only used, and only accepted by Megatron, when there is a pipeline.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        adjust_tensor_shapes_fn = None
    iterator: Iterable[Batch] = iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=placed_forward_step(forward_step),
        data_iterator=iterator,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
    )
