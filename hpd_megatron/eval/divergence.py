"""Teacher-forced comparison of students with the teacher on held-out sequences.

For each student checkpoint: the mean over supervised (response) tokens of the held-out
data of KL(teacher || student) and of the student's entropy, both at temperature 1 over
the real vocabulary, in nats, and the teacher's entropy. One process (TP = PP = 1) builds
the teacher and the student once and loads every checkpoint into the same student, so the
teacher's forward runs once.

Nothing of size [tokens, vocab] is formed, for a batch or for the held-out set: the models'
output layers are fused into the statistics as in the fused loss head
(``losses/fused_head.py``). Kept across checkpoints: the teacher's final hidden states
(after the final norm) at the supervised positions of every batch, [supervised tokens,
h_teacher] in the model's dtype (e.g. 8,897 tokens x 3,584 (a 7B teacher) x 2 bytes = 64 MB
in bf16, where its log-probabilities at a 152k vocabulary would take 5.4 GB), its output
layer, and the batches' token ids. Each checkpoint then runs the student batch by batch;
both models' logits are formed chunk by chunk, ``hidden rows @ weight[:vocab]^T``, for
``fused_chunk_tokens`` supervised tokens at a time (16 Mi elements: 110 tokens of a 152k
vocabulary), so at most a few fp32 [chunk, vocab] tensors exist at once. The teacher's
chunk logits are recomputed for every checkpoint (one GEMM per chunk, far cheaper than its
forward, which is not rerun).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from hpd_megatron.checkpoint.weights import load_model_weights
from hpd_megatron.data.dataset import DistillationDataset
from hpd_megatron.errors import ConfigError
from hpd_megatron.eval.source import inspect_checkpoint
from hpd_megatron.losses import IGNORE_INDEX
from hpd_megatron.losses.fused_head import fused_chunk_tokens
from hpd_megatron.losses.methods import FULL_VOCAB_METHODS
from hpd_megatron.models.builder import build_gpt_model, transformer_config
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.training.schedule import (
    batch_to_device,
    causal_lm_forward,
    causal_lm_hidden_states,
    output_weight,
)

FORWARD_KL = FULL_VOCAB_METHODS["fkl"]


def log_probs(model: torch.nn.Module, batch: dict[str, Tensor], vocab_size: int) -> Tensor:
    """The batch's log-probabilities [b, s, vocab], materialised (``study/bshare.py``)."""
    # Padded output rows are not tokens: they must not take probability mass.
    logits = causal_lm_forward(model, batch)[..., :vocab_size].float()
    return torch.log_softmax(logits, dim=-1)


def supervised_hidden(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """[supervised tokens, h]: the final hidden states at the batch's supervised positions
    (labels != -100), in sequence-first order (the same for every model)."""
    hidden = causal_lm_hidden_states(model, batch)  # [s, b, h]
    return hidden[(batch["labels"] != IGNORE_INDEX).t()]


def chunk_log_probs(hidden: Tensor, weight: Tensor) -> Tensor:
    """fp32 log-softmax [rows, vocab] of the logits ``hidden @ weight^T`` (``weight``: the
    output layer's real-vocabulary rows), the GEMM in the model's dtype as the output layer's."""
    return torch.log_softmax(torch.mm(hidden, weight.t()).float(), dim=-1)


def entropy_sum(logq: Tensor) -> Tensor:
    """The entropies -sum_v q log q of a chunk's rows, summed, from their log-probabilities."""
    return -(logq.exp() * logq).sum()


def forward_kl_sum(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) of a chunk's rows, summed (the loss's ``fkl`` terms)."""
    return FORWARD_KL.terms(logq, logp, 0.0, True)[1].sum()


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


def load_model(checkpoint: str | Path, description: ModelDescription) -> torch.nn.Module:
    """A model of ``description`` with the weights of ``checkpoint``, in eval mode."""
    model = build_gpt_model(description, transformer_config(description))
    load_model_weights(model, checkpoint)
    return model.eval()


def checkpoint_models(
    student: ModelDescription, checkpoints: Sequence[str | Path]
) -> Iterator[torch.nn.Module]:
    """One student model (built on the first step), loaded with each checkpoint in turn."""
    model = build_gpt_model(student, transformer_config(student))
    for checkpoint in checkpoints:
        load_model_weights(model, checkpoint)
        model.eval()
        yield model


def teacher_and_checkpoints(
    teacher_ckpt: str | Path,
    teacher: ModelDescription,
    student: ModelDescription,
    checkpoints: Sequence[str | Path],
    batches: list,
) -> tuple[list[Tensor], Iterator[Iterator[Tensor]]]:
    """The teacher's log-probs of ``batches`` (computed once, all kept), and per checkpoint
    the student's, batch by batch, from one student model each checkpoint is loaded into.
    Materialises [b, s, vocab] per batch: for a few sequences only (``study/bshare.py``);
    ``compare_with_teacher`` does not. Call under ``no_grad`` with a TP = PP = 1 group."""
    vocab = student.vocab_size
    teacher_model = load_model(teacher_ckpt, teacher)
    teacher_lp = [log_probs(teacher_model, batch, vocab) for batch in batches]
    students = (
        (log_probs(model, batch, vocab) for batch in batches)
        for model in checkpoint_models(student, checkpoints)
    )
    return teacher_lp, students


def chunk_sums(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Sums over the rows of one batch's supervised hidden states of KL(p || q) and the
    student's entropy, as float64 scalars on the device, ``chunk`` rows of logits at a time."""
    kl = entropy = student_hidden.new_zeros((), dtype=torch.float64)
    for start in range(0, student_hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logq = chunk_log_probs(student_hidden[rows], weight)
        logp = chunk_log_probs(teacher_hidden[rows], teacher_weight)
        kl = kl + forward_kl_sum(logp, logq).double()
        entropy = entropy + entropy_sum(logq).double()
    return kl, entropy


def teacher_entropy_sum(hidden: Tensor, weight: Tensor, chunk: int) -> Tensor:
    """The sum of the teacher's entropies over one batch's supervised rows (float64)."""
    total = hidden.new_zeros((), dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk):
        total = total + entropy_sum(chunk_log_probs(hidden[start : start + chunk], weight)).double()
    return total


@torch.no_grad()
def compare_with_teacher(
    teacher_ckpt: str | Path,
    student: ModelDescription,
    checkpoints: Sequence[str | Path],
    heldout_prefix: str | Path,
    seq_length: int,
    batch_size: int = 50,
    chunk_tokens: int | None = None,
) -> dict[str, object]:
    """``{"teacher_entropy": float, "tokens": int, "students": [{"kl_to_teacher",
    "entropy"} per checkpoint]}``. ``chunk_tokens``: supervised tokens per chunk of logits
    (default ``fused_chunk_tokens``: 16 Mi elements of the vocabulary)."""
    teacher = inspect_checkpoint(teacher_ckpt).description
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"teacher vocab_size {teacher.vocab_size} != student's {student.vocab_size}"
        )
    vocab = student.vocab_size
    chunk = fused_chunk_tokens(chunk_tokens, vocab)
    initialize_parallel(ParallelLayout(1, 1), models=[("student", student), ("teacher", teacher)])
    try:
        batches = sequence_batches(heldout_prefix, seq_length, batch_size)
        teacher_model = load_model(teacher_ckpt, teacher)
        teacher_hidden = [supervised_hidden(teacher_model, batch) for batch in batches]
        # Only its output layer is needed from here on (padded rows are not tokens).
        teacher_weight = output_weight(teacher_model).detach()[:vocab]
        del teacher_model
        tokens = sum(hidden.shape[0] for hidden in teacher_hidden)
        teacher_entropy = sum(
            float(teacher_entropy_sum(hidden, teacher_weight, chunk)) for hidden in teacher_hidden
        )
        results = []
        for model in checkpoint_models(student, checkpoints):
            weight = output_weight(model).detach()[:vocab]
            sums = [
                chunk_sums(supervised_hidden(model, batch), hidden, weight, teacher_weight, chunk)
                for batch, hidden in zip(batches, teacher_hidden)
            ]
            kl, entropy = (float(sum(parts)) for parts in zip(*sums))
            results.append({"kl_to_teacher": kl / tokens, "entropy": entropy / tokens})
        return {"teacher_entropy": teacher_entropy / tokens, "tokens": tokens, "students": results}
    finally:
        destroy_parallel()
