"""What a plan's numbers depend on: the run, its layout, both models' sizes and what the
trainer decides from them (the padded vocabulary, micro-batches, sequence parallelism, each
DP rank's rollout rows)."""

from __future__ import annotations

from dataclasses import dataclass

from hpd_megatron.models.builder import padded_vocab_size
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.plan.counts import ParameterCount, count_parameters
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.performance import sequence_parallel
from hpd_megatron.training.rollout import is_rollout


@dataclass
class Setting:
    """What a plan's numbers depend on: the run, its layout and both models' sizes."""

    run: RunConfig
    layout: ParallelLayout
    student: ModelDescription
    teacher: ModelDescription | None
    student_count: ParameterCount
    """With the padded vocabulary, as for all the memory numbers."""
    teacher_count: ParameterCount | None
    vocab: int
    """The student's vocabulary padded for TP."""
    micro_batches: int
    """Per step and data-parallel rank."""
    sequence_parallel: bool
    rollout_rows: list[int]
    """Rollout samples per step on each DP rank (the trainer's choice of positions)."""

    @property
    def element_bytes(self) -> int:
        """Bytes of one student weight or activation element."""
        return 2 if self.run.params_dtype == "bf16" else 4

    @property
    def rollout_rows_per_dp_rank(self) -> int:
        """On the busiest rank: the slowest sets the step."""
        return max(self.rollout_rows)


def make_setting(run: RunConfig, layout: ParallelLayout) -> Setting:
    tp = layout.tensor_model_parallel_size
    student = run.student.description("student")
    teacher = run.teacher_description()
    vocab = padded_vocab_size(student.vocab_size, tp)
    mbs = run.schedule.micro_batch_size
    # What the trainer decides on a GPU node, where Transformer Engine is present.
    te = run.performance.transformer_impl == "transformer_engine"
    return Setting(
        run,
        layout,
        student,
        teacher,
        count_parameters(student, vocab),
        count_parameters(teacher, padded_vocab_size(teacher.vocab_size, tp)) if teacher else None,
        vocab,
        max(run.schedule.global_batch_size // (mbs * layout.data_parallel_size), 1),
        sequence_parallel(run.performance, tp, te),
        rollout_rows(run, layout.data_parallel_size),
    )


def rollout_rows(run: RunConfig, dp: int) -> list[int]:
    """Each DP rank's rollout samples per step: the trainer rolls out the global batch's
    positions that ``is_rollout`` picks, and rank k holds the k-th slice of the batch."""
    share = run.schedule.global_batch_size // dp
    fraction = run.rollout.fraction
    return [
        sum(is_rollout(position, fraction) for position in range(k * share, (k + 1) * share))
        for k in range(dp)
    ]
