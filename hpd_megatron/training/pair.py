"""A frozen teacher and a trainable student in one pipeline.

Both models live on the same TP x PP grid: pipeline stage k holds stage k of each.
Between stages the two hidden states travel as one tensor, the student's first and
the teacher's after it along the hidden dimension, so Megatron-Core's schedule needs
only to be told the wider shape (``adjust_tensor_shapes_fn``). The teacher runs under
``no_grad``: its half of the activation carries no graph, and the gradient the
schedule sends back for it is ignored.

With ``fused_head`` the last stage runs neither output layer: it returns both models'
final hidden states, and the loss computes the logits chunk by chunk
(hpd_megatron/losses/fused_head.py). The teacher's output shard is moved onto the
student's vocabulary layout once, here, when their padded widths differ.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule

from hpd_megatron.losses.fused_head import OutputHead, align_teacher_weight
from hpd_megatron.losses.vocab_parallel import resolve_tp_group
from hpd_megatron.training.schedule import (
    Batch,
    causal_lm_forward,
    causal_lm_hidden_states,
    output_weight,
    unwrap_model,
)
from hpd_megatron.training.timing import RegionTimer


class DistillationPair(MegatronModule):
    """What the schedule sees as "the model": student stage + teacher stage.

    ``student`` may be wrapped in Megatron's DistributedDataParallel; ``teacher`` is a
    bare GPTModel stage, frozen here. ``forward`` returns the stage's output and, on the
    last stage, the teacher's logits for the loss (None elsewhere, or without a teacher);
    with ``fused_head``, the last stage's output is the student's final hidden states and
    the teacher's is its ``OutputHead``.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        student_hidden: int,
        teacher_hidden: int,
        fused_head: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(config=unwrap_model(student).config)
        self.student = student
        self.teacher = teacher
        self.student_hidden = student_hidden
        self.teacher_hidden = teacher_hidden if teacher is not None else 0
        self.teacher_dtype = (
            unwrap_model(teacher).config.params_dtype if teacher is not None else None
        )
        self.model_type = unwrap_model(student).model_type
        self.teacher_timer = RegionTimer()
        """The teacher's forward time (the metrics' teacher share of a step)."""
        if teacher is not None:
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)
        self.fused_head = fused_head and self.post_process
        self.teacher_output_weight = None
        if self.fused_head and teacher is not None:
            self.teacher_output_weight = align_teacher_weight(
                output_weight(teacher),
                output_weight(student).shape[0],
                vocab_size,
                resolve_tp_group(),
            )

    def set_input_tensor(self, input_tensor: Any) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None or self.teacher is None:
            unwrap_model(self.student).set_input_tensor(input_tensor)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            return
        student_part, teacher_part = torch.split(
            input_tensor, [self.student_hidden, self.teacher_hidden], dim=-1
        )
        unwrap_model(self.student).set_input_tensor(student_part)
        # The activation travels in the student's dtype; the teacher may compute in bf16.
        self.teacher.set_input_tensor(teacher_part.detach().to(self.teacher_dtype))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | OutputHead | None]:
        run_stage = causal_lm_hidden_states if self.fused_head else causal_lm_forward
        student_out = run_stage(self.student, batch)
        if self.teacher is None:
            return student_out, None
        with torch.no_grad(), self.teacher_timer.region():
            teacher_out = run_stage(self.teacher, batch)
        if self.fused_head:
            sequence_parallel = self.teacher.config.sequence_parallel
            return student_out, OutputHead(
                teacher_out, self.teacher_output_weight, sequence_parallel
            )
        if self.post_process:
            return student_out, teacher_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1), None

    def student_head(self, hidden: torch.Tensor) -> OutputHead:
        """The student's input to the fused head: its last stage's hidden states and output
        shard (the parameter, so its gradient reaches DDP's main_grad)."""
        sequence_parallel = unwrap_model(self.student).config.sequence_parallel
        return OutputHead(hidden, output_weight(self.student), sequence_parallel)

    def set_is_first_microbatch(self) -> None:
        """Each model recasts its FP8 weights by its own config (the schedule calls this on
        the first micro-batch of a step, ``forward_step`` in Megatron-Core's schedules).

        The pair carries the student's config; ``MegatronModule.set_is_first_microbatch``
        on it would look only at the student's ``fp8`` and, unset, leave the FP8 teacher's
        linears reusing their first weight cast for the whole job.
        """
        unwrap_model(self.student).set_is_first_microbatch()
        if self.teacher is not None:
            self.teacher.set_is_first_microbatch()

    def adjust_tensor_shapes(self, recv_shapes: list, send_shapes: list) -> tuple[list, list]:
        """Widen the p2p shapes by the teacher's hidden size (for the 1F1B schedule)."""
        widen = lambda shapes: [(s, b, h + self.teacher_hidden) for s, b, h in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    # What Megatron's helpers look up on "the model" refers to the student.
    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return unwrap_model(self.student).shared_embedding_or_output_weight()

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return unwrap_model(self.student).share_embeddings_and_output_weights

    @property
    def pre_process(self) -> bool:
        return unwrap_model(self.student).pre_process

    @property
    def post_process(self) -> bool:
        return unwrap_model(self.student).post_process

    def train(self, mode: bool = True) -> DistillationPair:
        self.training = mode
        self.student.train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode
        return self
