"""The one map from the project's dtype names to torch dtypes.

``DTYPES`` holds the names recipes and command-line options use (``params_dtype``,
``--dtype``, ``--params-dtype``); ``HF_DTYPE_NAMES`` maps the names a Hugging Face
config.json records (``torch_dtype`` / ``dtype``) to ours.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
HF_DTYPE_NAMES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
