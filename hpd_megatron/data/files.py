"""Reading a JSON object, and writing several output files so that a failure leaves none.

Every problem with an input file is one ``DataError`` whose message starts with the file
(and line or record), e.g. ``train.jsonl:17: not valid JSON (Expecting ',' delimiter)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hpd_megatron.errors import ConfigError, DataError, HpdError


def read_json_object(path: Path, error: type[HpdError] = DataError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (naming the file, and the line when the JSON is
    broken) if it holds anything else."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as problem:
        raise error(f"{path}: not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path}:{problem.lineno}: not valid JSON ({problem.msg})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def not_utf8(error: UnicodeDecodeError) -> str:
    """What is wrong with a file that is not UTF-8 text."""
    return f"not UTF-8 text ({error.reason} at byte {error.start})"


@contextlib.contextmanager
def staged_files(paths: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Yield temporary stand-ins for ``paths``; move them into place only if the body succeeds.

    The stand-ins live in a hidden directory next to the first output (same file system, so
    the final moves are renames), and are moved in the order given: put the file whose
    presence means "complete" (a sidecar) last. On any error the directory is removed and
    nothing under the final names is created or touched.
    """
    paths = [Path(p) for p in paths]
    parent = paths[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{paths[0].name}.", dir=parent))
    try:
        staged = [stage / f"{i}-{p.name}" for i, p in enumerate(paths)]
        yield staged
        for temporary, final in zip(staged, paths):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_outputs(
    option: str, outputs: Sequence[str | Path], inputs: dict[str, str | Path | None]
) -> None:
    """Before any work: every output can be created, and none is one of the inputs.

    Generation runs for hours before it writes; an unwritable ``--out`` found then loses
    them. An output that is an input (``--output-prefix train`` beside ``train.json``, or
    ``--out`` equal to ``--data``) would be replaced by the final rename. ``inputs`` maps an
    option to its file or directory (every file in it counts); None is skipped.
    """
    read = {
        file.resolve(): name
        for name, value in inputs.items()
        if value is not None
        for file in _files(Path(value))
    }
    for output in map(Path, outputs):
        if output.resolve() in read:
            raise ConfigError(
                f"{option}: {output} is the {read[output.resolve()]} file; writing it would "
                "destroy the input (choose another output)"
            )
        if output.is_dir():
            raise ConfigError(f"{option}: {output} is a directory, not a file it can write")
        _check_creatable(option, output.parent)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return [file for file in path.iterdir() if file.is_file()]
    return [path] if path.is_file() else []


def _check_creatable(option: str, directory: Path) -> None:
    """``directory`` exists or can be made, and a file can be created in it."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option}: {existing} is not a directory, so {directory} cannot be made")
    try:  # a real probe: os.access trusts the local uid, which root-squashing NFS overrides
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{option}: cannot write in {existing} ({error.strerror})") from None
