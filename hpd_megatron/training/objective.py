"""The forward step the pipeline schedule calls, and the distillation loss it binds.

As in Megatron's ``pretrain_gpt.py``, ``forward_step`` runs the model on a micro-batch
and returns its output with a loss function into which ``functools.partial`` has bound
everything else the loss needs: here the micro-batch and the teacher's logits, which
the pair returns beside the student's on the last stage. With ``loss.fused_head`` both
are hidden states with their output layers (``OutputHead``), and the loss is the fused one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from hpd_megatron.losses import SamplingOptions, distillation_loss
from hpd_megatron.losses.distillation import fused_distillation_loss
from hpd_megatron.losses.fused_head import OutputHead
from hpd_megatron.parallel.placement import to_device
from hpd_megatron.training.components import sample_seed
from hpd_megatron.training.config import UNFUSED_CHUNK_TOKENS, RunConfig
from hpd_megatron.training.pair import DistillationPair
from hpd_megatron.training.schedule import Batch

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
Model = torch.Tensor | OutputHead | None
"""A model's output for the loss: logits, or hidden states with the output layer (fused)."""


class DistillationObjective:
    """The recipe's loss for one run; ``compute_loss`` is the place to change it."""

    def __init__(self, run: RunConfig, vocab_size: int) -> None:
        self.run = run
        self.vocab_size = vocab_size

    def forward_step(
        self, step: int, pair: DistillationPair, batch: Batch
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], LossOutput]]:
        """For the schedule (bind ``step`` first): the stage's output and its loss function."""
        output, teacher_out = pair(batch)
        student_head = pair.student_head if self.run.loss.fused_head else None
        return output, partial(self.loss_func, step, batch, teacher_out, student_head)

    def loss_func(
        self,
        step: int,
        batch: Batch,
        teacher_out: Model,
        student_head: Callable[[torch.Tensor], OutputHead] | None,
        output: torch.Tensor,
    ) -> LossOutput:
        """(loss sum, token count, report of sums) as the schedule expects with
        ``calculate_per_token_loss``; sums, so that the loop forms exact global means."""
        student_out = output if student_head is None else student_head(output)
        loss_sum, diagnostics = self.compute_loss(step, batch, teacher_out, student_out)
        num_tokens = diagnostics["num_tokens"].to(torch.int)
        skipped = ("loss_sum", "num_tokens", "loss")
        report = {
            name: value.detach().double() * num_tokens
            for name, value in diagnostics.items()
            if name not in skipped
        }
        report["loss"] = loss_sum.detach().double()
        report["num_tokens"] = num_tokens.double()
        return loss_sum, num_tokens, report

    def compute_loss(
        self, step: int, batch: Batch, teacher_out: Model, student_out: Model
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed distillation loss of a micro-batch, and its diagnostics; each model's
        output is its logits, or with ``loss.fused_head`` its ``OutputHead``."""
        loss = self.run.loss
        uniforms = None
        if loss.method == "hpd":
            # Drawn on the host (the same numbers on every device and layout), then moved
            # next to the labels, where the loss reads them.
            labels = batch["labels"]
            uniforms = to_device(
                self.hpd_uniforms(step, batch["sample_index"], labels.shape[1]), labels.device
            )
        fused = isinstance(student_out, OutputHead)
        loss_function = fused_distillation_loss if fused else distillation_loss
        return loss_function(
            student_out,
            teacher_out,
            batch["labels"],
            loss.method,
            vocab_size=self.vocab_size,
            alpha=loss.alpha,
            beta=loss.beta,
            hpd_b=loss.hpd_b,
            hpd_b_floor=loss.hpd_b_floor,
            reduction="sum",
            chunk_size=loss.chunk_size or (None if fused else UNFUSED_CHUNK_TOKENS),
            sampling=SamplingOptions(uniforms=uniforms),
        )

    def hpd_uniforms(self, step: int, sample_index: torch.Tensor, seq_length: int) -> torch.Tensor:
        """HPD's inverse-CDF draws: each sequence's depend on that sequence alone."""
        return torch.stack(
            [
                torch.rand(
                    seq_length,
                    dtype=torch.float64,
                    generator=torch.Generator().manual_seed(
                        sample_seed(self.run.seed, step, int(index))
                    ),
                )
                for index in sample_index
            ]
        )
