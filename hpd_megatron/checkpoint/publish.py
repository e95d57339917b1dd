"""All-or-nothing directories: every output a run or a conversion publishes goes through here.

A directory is written under ``NAME.partial`` by every rank, and renamed to ``NAME`` by
rank 0 only after all of them finished. A process killed half-way leaves ``NAME`` as it
was (a stale ``.partial`` is cleared by the next attempt); an error on any rank removes
the partial directory. Used by the training save, the export, and both converters.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _replace(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``; an existing ``out`` is set aside first, then removed,
    so that ``out`` names a complete directory at every moment but one rename."""
    previous = out.with_name(out.name + ".previous")
    if out.exists():
        os.replace(out, previous)
    os.replace(partial, out)
    if previous.exists():
        shutil.rmtree(previous)


@contextmanager
def publish_directory(out: str | Path) -> Iterator[Path]:
    """Collective: yield ``OUT.partial`` to write into; publish it as ``OUT`` at the end.

    Every rank of the default process group enters and leaves together. An ``OUT`` that
    already exists is replaced only once the new directory is complete.
    """
    out = Path(out)
    partial = _partial(out)
    rank = dist.get_rank()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    try:
        yield partial
        dist.barrier()
        if rank == 0:
            _replace(partial, out)
        dist.barrier()
    except BaseException:
        if rank == 0 and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        raise
