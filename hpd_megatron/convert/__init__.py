"""Hugging Face <-> Megatron-Core checkpoint conversion.

``hf_config`` maps config.json onto a ModelDescription and back, ``mapping`` says which
Hugging Face tensors (and which slices of them) make each Megatron tensor,
``hf_to_megatron`` and ``megatron_to_hf`` stream the weights, ``verify`` compares the
two models' logits. The command-line wrappers live in tools/.
"""

from hpd_megatron.errors import ConversionError

__all__ = ["ConversionError"]
