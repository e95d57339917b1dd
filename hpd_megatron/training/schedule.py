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
    schedule's p2p receive (set_input_tensor), and the tokens are ignored there.
    Causal attention builds its own mask, so none is passed.
    """
    return model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
    )


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
