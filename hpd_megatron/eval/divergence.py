"""Teacher-forced comparison of students with the teacher on held-out sequences.

For each student checkpoint: the mean over supervised (response) tokens of the held-out
data of KL(teacher || student) and of the student's entropy, both at temperature 1 over
the real vocabulary, in nats. One process (TP = PP = 1) builds the teacher and the student
once and loads every checkpoint into the same student, so the teacher's log-probabilities
are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    vocab = student.vocab_size
    initialize_parallel(ParallelLayout(1, 1), models=[("student", student), ("teacher", teacher)])
    try:
        data = DistillationDataset(heldout_prefix, seq_length)
        batches = [
            batch_to_device(data.batch(range(i, min(i + batch_size, len(data)))))
            for i in range(0, len(data), batch_size)
        ]
        masks = [batch["labels"] != IGNORE_INDEX for batch in batches]

        teacher_model = build_gpt_model(teacher, transformer_config(teacher))
        load_model_weights(teacher_model, teacher_ckpt)
        teacher_model.eval()
        teacher_lp = [log_probs(teacher_model, batch, vocab) for batch in batches]
        tokens = sum(int(mask.sum()) for mask in masks)
        teacher_entropy = (
            sum(float(-(lp.exp() * lp).sum(-1)[mask].sum()) for lp, mask in zip(teacher_lp, masks))
            / tokens
        )

        model = build_gpt_model(student, transformer_config(student))
        results = []
        for checkpoint in checkpoints:
            load_model_weights(model, checkpoint)
            model.eval()
            kl = entropy = 0.0
            for batch, mask, lp in zip(batches, masks, teacher_lp):
                lq = log_probs(model, batch, vocab)
                kl += float((lp.exp() * (lp - lq)).sum(-1)[mask].sum())
                entropy += float(-(lq.exp() * lq).sum(-1)[mask].sum())
            results.append({"kl_to_teacher": kl / tokens, "entropy": entropy / tokens})
        return {"teacher_entropy": teacher_entropy, "tokens": tokens, "students": results}
    finally:
        destroy_parallel()
