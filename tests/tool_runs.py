"""The command-line entry points run in this process, as their ``__main__`` runs them.

``load_tool("prepare_data")`` imports tools/prepare_data.py (tools/ is not a package);
``run_main(main, argv)`` runs ``main(argv)`` under ``hpd_megatron.cli.run_cli`` and returns
its exit code and what it wrote to stderr (the one ``error: ...`` line on bad input).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from hpd_megatron.cli import run_cli

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``run_cli`` around ``main(argv)``."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        run_cli(lambda: main(list(argv)))
    return exit_info.value.code, stderr.getvalue()
