"""The one exception a conversion raises for bad input (the CLI prints it in one line)."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint, config or option the converters cannot use; the message names it."""
