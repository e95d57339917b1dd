"""HPD's B term's share of the gradient at the logits, measured teacher-forced.

HPD's loss per token is -(A log q(y) + B [yh != y] log q(yh)) with A and B held constant,
so its gradient with respect to the student's logits z_t of token t is

    g_t = A_t (q_t - e_y) + B_t (q_t - e_yh),

an A part and a B part. Over the supervised tokens of a set of sequences, B's share is
||G_B|| / ||G_A + G_B|| (Frobenius norms over tokens and vocabulary): 0 when B never acts,
about 1 when B's part dominates. It is measured at the logits, not at the parameters (the
chain rule through the network mixes the two parts), on the student's own sample yh drawn
with a fixed seed, for a given ``hpd_b`` variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from hpd_megatron.eval.divergence import sequence_batches, teacher_and_checkpoints
from hpd_megatron.eval.source import inspect_checkpoint
from hpd_megatron.losses import IGNORE_INDEX
from hpd_megatron.losses.methods import HpdB, PointLogProbs, hpd_token_weights
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
from hpd_megatron.parallel.layout import ParallelLayout


def logit_gradient_parts(
    logq: Tensor,
    logp: Tensor,
    labels: Tensor,
    sampled: Tensor,
    b_mode: HpdB = "reference",
    b_floor: float = -1.0,
) -> dict[str, float]:
    """Squared Frobenius norms of the A part, the B part and their sum over the supervised
    tokens (``labels`` != -100), and the sums of |A| and |B| and the token count.

    ``logq``/``logp``: [..., V] log-softmaxes of student and teacher; ``sampled``: yh.
    """
    mask = labels != IGNORE_INDEX
    lq, lp, y, yh = logq[mask].double(), logp[mask].double(), labels[mask], sampled[mask]

    def at(table: Tensor, ids: Tensor) -> Tensor:
        return table.gather(-1, ids[:, None]).squeeze(-1)

    point = PointLogProbs(at(lq, y), at(lp, y), at(lq, yh), at(lp, yh), y == yh)
    weights = hpd_token_weights(point, b_mode, b_floor)
    q = lq.exp()
    grad_a = weights.coef_y[:, None] * (q - torch.nn.functional.one_hot(y, q.shape[-1]))
    grad_b = weights.coef_s[:, None] * (q - torch.nn.functional.one_hot(yh, q.shape[-1]))
    return {
        "a": float(grad_a.square().sum()),
        "b": float(grad_b.square().sum()),
        "total": float((grad_a + grad_b).square().sum()),
        "abs_a": float(weights.coef_y.abs().sum()),
        "abs_b": float(weights.coef_s.abs().sum()),
        "tokens": int(mask.sum()),
    }


def share(parts: dict[str, float]) -> dict[str, float]:
    """B's share ||G_B|| / ||G|| and the mean |A| and |B| per token from summed parts."""
    tokens = max(parts["tokens"], 1)
    return {
        "b_share": math.sqrt(parts["b"] / parts["total"]) if parts["total"] > 0 else 0.0,
        "b_over_a": math.sqrt(parts["b"] / parts["a"]) if parts["a"] > 0 else 0.0,
        "mean_abs_a": parts["abs_a"] / tokens,
        "mean_abs_b": parts["abs_b"] / tokens,
    }


@torch.no_grad()
def b_gradient_share(
    teacher_ckpt: str | Path,
    student: ModelDescription,
    checkpoints: Sequence[str | Path],
    prefix: str | Path,
    seq_length: int,
    b_mode: HpdB,
    sequences: int,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict[str, float]]:
    """``share`` for each checkpoint on the first ``sequences`` sequences at ``prefix``; the
    samples yh use the same seed for every checkpoint. One process, TP = PP = 1, as
    ``eval/divergence.compare_with_teacher``."""
    teacher = inspect_checkpoint(teacher_ckpt).description
    initialize_parallel(ParallelLayout(1, 1), models=[("student", student), ("teacher", teacher)])
    try:
        batches = sequence_batches(prefix, seq_length, batch_size, sequences)
        teacher_lp, students = teacher_and_checkpoints(
            teacher_ckpt, teacher, student, checkpoints, batches
        )
        results = []
        for student_lp in students:
            generator = torch.Generator().manual_seed(seed)
            totals: dict[str, float] = {}
            for batch, lp, lq in zip(batches, teacher_lp, student_lp):
                flat = lq.exp().reshape(-1, lq.shape[-1])
                sampled = torch.multinomial(flat, 1, generator=generator).view(lq.shape[:-1])
                parts = logit_gradient_parts(lq, lp, batch["labels"], sampled, b_mode)
                for name, value in parts.items():
                    totals[name] = totals.get(name, 0) + value
            results.append(share(totals))
        return results
    finally:
        destroy_parallel()
