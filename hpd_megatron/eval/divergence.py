"""Teacher-forced comparison of students with the teacher on held-out sequences.

For each student checkpoint: the mean over supervised (response) tokens of the held-out
data of KL(teacher || student) and of the student's entropy, both at temperature 1 over
the real vocabulary, in nats. One process (TP = PP = 1) builds the teacher and the student
once and loads every checkpoint into the same student, so the teacher's log-probabilities
are computed once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from hpd_megatron.checkpoint.weights import load_model_weights
from hpd_megatron.data.dataset import DistillationDataset
from hpd_megatron.errors import ConfigError
from hpd_megatron.eval.source import inspect_checkpoint
from hpd_megatron.losses import IGNORE_INDEX
from hpd_megatron.models.builder import build_gpt_model, transformer_config
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.training.schedule import batch_to_device, causal_lm_forward


def log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab_size: int
) -> torch.Tensor:
    # Padded output rows are not tokens: they must not take probability mass.
    logits = causal_lm_forward(model, batch)[..., :vocab_size].float()
    return torch.log_softmax(logits, dim=-1)


def sequence_batches(
    prefix: str | Path, seq_length: int, batch_size: int, count: int | None = None
) -> list:
    """The first ``count`` (None: all) sequences at ``prefix`` in device batches."""
    data = DistillationDataset(prefix, seq_length)
    count = len(data) if count is None else min(count, len(data))
    return [
        batch_to_device(data.batch(range(i, min(i + batch_size, count))))
        for i in range(0, count, batch_size)
    ]


def teacher_and_checkpoints(
    teacher_ckpt: str | Path,
    teacher: ModelDescription,
    student: ModelDescription,
    checkpoints: Sequence[str | Path],
    batches: list,
) -> tuple[list[torch.Tensor], Iterator[Iterator[torch.Tensor]]]:
    """The teacher's log-probs of ``batches`` (computed once), and per checkpoint the
    student's, batch by batch, from one student model each checkpoint is loaded into. Call
    under ``no_grad`` with a TP = PP = 1 process group."""
    vocab = student.vocab_size
    teacher_model = build_gpt_model(teacher, transformer_config(teacher))
    load_model_weights(teacher_model, teacher_ckpt)
    teacher_model.eval()
    teacher_lp = [log_probs(teacher_model, batch, vocab) for batch in batches]

    def students() -> Iterator[Iterator[torch.Tensor]]:
        model = build_gpt_model(student, transformer_config(student))
        for checkpoint in checkpoints:
            load_model_weights(model, checkpoint)
            model.eval()
            yield (log_probs(model, batch, vocab) for batch in batches)

    return teacher_lp, students()


@torch.no_grad()
def compare_with_teacher(
    teacher_ckpt: str | Path,
    student: ModelDescription,
    checkpoints: Sequence[str | Path],
    heldout_prefix: str | Path,
    seq_length: int,
    batch_size: int = 50,
) -> dict[str, object]:
    """``{"teacher_entropy": float, "students": [{"kl_to_teacher", "entropy"} per checkpoint]}``."""
    teacher = inspect_checkpoint(teacher_ckpt).description
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"teacher vocab_size {teacher.vocab_size} != student's {student.vocab_size}"
        )
    initialize_parallel(ParallelLayout(1, 1), models=[("student", student), ("teacher", teacher)])
    try:
        batches = sequence_batches(heldout_prefix, seq_length, batch_size)
        masks = [batch["labels"] != IGNORE_INDEX for batch in batches]
        teacher_lp, students = teacher_and_checkpoints(
            teacher_ckpt, teacher, student, checkpoints, batches
        )
        tokens = sum(int(mask.sum()) for mask in masks)
        teacher_entropy = (
            sum(float(-(lp.exp() * lp).sum(-1)[mask].sum()) for lp, mask in zip(teacher_lp, masks))
            / tokens
        )
        results = []
        for student_lp in students:
            kl = entropy = 0.0
            for mask, lp, lq in zip(masks, teacher_lp, student_lp):
                kl += float((lp.exp() * (lp - lq)).sum(-1)[mask].sum())
                entropy += float(-(lq.exp() * lq).sum(-1)[mask].sum())
            results.append({"kl_to_teacher": kl / tokens, "entropy": entropy / tokens})
        return {"teacher_entropy": teacher_entropy, "tokens": tokens, "students": results}
    finally:
        destroy_parallel()
