"""Vocab-parallel distillation losses: HPD and the divergences it unifies.

``distillation_loss`` is the entry point; ``sample_student_tokens`` exposes HPD's
sampler, and ``SamplingOptions`` says where both take the sample from; ``methods`` holds
every method's weight (a new divergence is one function there).
"""

from hpd_megatron.losses.distillation import (
    IGNORE_INDEX,
    Reduction,
    distillation_loss,
    sample_student_tokens,
)
from hpd_megatron.losses.methods import FULL_VOCAB_METHODS, METHODS, TOKEN_METHODS, MethodName
from hpd_megatron.losses.sampling import SAMPLERS, Sampler, SamplingOptions
from hpd_megatron.losses.vocab_parallel import FROM_PARALLEL_STATE

__all__ = [
    "FROM_PARALLEL_STATE",
    "FULL_VOCAB_METHODS",
    "IGNORE_INDEX",
    "METHODS",
    "SAMPLERS",
    "TOKEN_METHODS",
    "MethodName",
    "Reduction",
    "Sampler",
    "SamplingOptions",
    "distillation_loss",
    "sample_student_tokens",
]
