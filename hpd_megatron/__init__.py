"""Hybrid Policy Distillation on Megatron-Core."""

import warnings

# Megatron-Core warns in every process, at import, that it falls back to local layers and
# torch optimizers without Transformer Engine and apex. The trainer's start-up line says
# which layer spec and which extensions a run uses, once.
warnings.filterwarnings(
    "ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning
)
