"""Micro-batches through Megatron-Core's pipeline schedules.

``run_schedule`` is the one place the project calls ``get_forward_backward_func``: it
feeds a list of micro-batches to whichever schedule the PP size selects and returns
what the last stage's loss function reported for each micro-batch (empty on other
stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

Batch = dict[str, torch.Tensor]
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


def run_schedule(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    forward_step: ForwardStep,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    adjust_tensor_shapes_fn: Callable[[list, list], tuple[list, list]] | None = None,
) -> list[Any]:
    """Forward (and backward unless ``forward_only``) of every micro-batch.

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

    def forward_step_func(data_iterator, stage):
        return forward_step(stage, next(data_iterator))

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iterator,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
    )
