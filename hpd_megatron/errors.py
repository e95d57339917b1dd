"""The project's one error root: bad input, or a run that cannot go on.

Every entry point catches ``HpdError`` (and nothing broader) through ``hpd_megatron.cli``
and prints its message as one line. Each message names the file, line, key or tensor at
fault. The ``ValueError``/``RuntimeError`` bases are kept so that library callers that
caught those before still do.
"""

from __future__ import annotations


class HpdError(Exception):
    """Root of every error the command-line tools report as one line."""


class ConfigError(HpdError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class DataError(HpdError, ValueError):
    """An input file is missing or malformed; the message names the file and line or record."""


class CheckpointError(HpdError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class ConversionError(HpdError, ValueError):
    """A checkpoint, config or option the converters cannot use; the message names it."""


class NonFiniteTraining(HpdError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""
