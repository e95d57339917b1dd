"""Credentials stay home: masked in everything the project logs or saves.

Two kinds are masked, wherever they appear in a string:

- the user-info of a URI (``https://user:pass@host`` becomes ``https://***@host``);
- the value of a secret-looking environment variable (a name containing TOKEN, PASSWORD,
  SECRET or KEY) that a recipe's ``${NAME}`` expanded (``hpd_megatron.config``), and, in a
  shell script, the value assigned to such a name.

Masking happens at the edges (MLflow params, tags and warnings, the config.yaml artifact,
checkpoints, the sbatch script's copy); the process itself keeps the real values, since it
needs them to connect.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hpd_megatron.config import SECRET_VARIABLE, expanded_secrets

if TYPE_CHECKING:
    from hpd_megatron.training.config import RunConfig

REDACTED = "***"
# scheme://USERINFO@host: user-info ends at the first "@" before any "/" (RFC 3986).
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# NAME=value or export NAME=value at the start of a shell line.
_ASSIGNMENT = re.compile(r"^(\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=)(.*)$", re.MULTILINE)


def redact(text: str) -> str:
    """``text`` with URI credentials and expanded secret values masked."""
    text = _URI_USERINFO.sub(f"{REDACTED}@", text)
    # Longest first, so a secret containing another is masked whole.
    for secret in sorted(expanded_secrets(), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_values(data: Any) -> Any:
    """A copy of nested mappings/lists/dataclasses with every string ``redact``-ed."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if isinstance(data, Mapping):
        return {key: redact_values(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_values(item) for item in data)
    return redact(data) if isinstance(data, str) else data


def redact_script(text: str) -> str:
    """A shell script with ``redact`` applied and secret-named assignments masked."""

    def mask(match: re.Match) -> str:
        if SECRET_VARIABLE.search(match.group(2)) and match.group(3):
            return f"{match.group(1)}{REDACTED}"
        return match.group(0)

    return _ASSIGNMENT.sub(mask, redact(text))


def redacted_config(run: RunConfig) -> dict[str, Any]:
    """The resolved config as config.yaml and checkpoints keep it: credentials masked."""
    return redact_values(run.to_dict())
