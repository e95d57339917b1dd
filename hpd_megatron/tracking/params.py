"""The resolved config as MLflow params: dotted keys, string values within MLflow's limit."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH) and
# longer tag values (MAX_TAG_VAL_LENGTH); both have been these sizes since MLflow 2.x.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
TRUNCATION_MARK = "...[truncated]"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1, "c": [1, 2]}, "d": None}`` becomes
    ``{"a.b": "1", "a.c": "[1, 2]", "d": "None"}``.

    Nested mappings (and dataclasses) become dotted keys; everything else, lists included,
    is ``str()``; an empty mapping is kept as ``"{}"`` so the key still shows up.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[name] = truncate(str(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, visibly marked when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK
