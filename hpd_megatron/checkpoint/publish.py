"""All-or-nothing directories: every output a run or a conversion publishes goes through here.

A directory is written under ``NAME.partial`` by every rank, and renamed to ``NAME`` by
rank 0 only after all of them finished. A process killed half-way leaves ``NAME`` as it
was (a stale ``.partial`` is cleared by the next attempt); an error on any rank removes
the partial directory. Used by the training save, the export, and both converters.

Rank 0 alone looks at the file system and decides (may ``NAME`` be replaced, did the rename
work); the decision is broadcast, so a refusal is raised on every rank with the same line
instead of one rank failing while the others wait at a barrier.

Published means durable: the renamed directory, its files and its parent are fsynced, so a
power cut after the tracker names a save cannot leave it half on disk.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from hpd_megatron.errors import CheckpointError

Refusal = Callable[[Path], "str | None"]
"""Why an existing directory must not be replaced (None: it may be)."""


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _previous(out: Path) -> Path:
    return out.with_name(out.name + ".previous")


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry list to disk (a directory: also its files)."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``; an existing ``out`` is set aside first, then removed,
    so that ``out`` names a complete directory at every moment but one rename."""
    previous = _previous(out)
    fsync_path(partial)
    if out.exists():
        os.replace(out, previous)
    os.replace(partial, out)
    fsync_path(out.parent)
    if previous.exists():
        shutil.rmtree(previous)


def _problem_before(out: Path, refuse: Refusal | None) -> str | None:
    """Rank 0: why ``out`` cannot be published (module doc), after clearing our leftovers."""
    previous = _previous(out)
    for existing in (out, previous):
        reason = refuse(existing) if refuse is not None and existing.exists() else None
        if reason is not None:
            return f"{existing}: {reason}; refusing to replace it (remove it or choose another)"
    # Only _replace makes a .previous, and it was killed before removing it.
    if previous.exists():
        shutil.rmtree(previous)
    partial = _partial(out)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return None


def _agreed(problem: str | None) -> None:
    """Collective: raise rank 0's ``problem`` on every rank."""
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise CheckpointError(shared[0])


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere among ``error``'s causes. torch's CheckpointException keeps each
    rank's failure in ``failures``, and Megatron's forked writers pass an OSError on only as
    the text of a RuntimeError ("Worker failure: [Errno 28] ...")."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "errno", None) == errno.ENOSPC or (
            f"[Errno {errno.ENOSPC}]" in str(current)
        ):
            return True
        pending += [c for c in (current.__cause__, current.__context__) if c is not None]
        for failure in (getattr(current, "failures", None) or {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


@contextmanager
def publish_directory(
    out: str | Path, refuse: Refusal | None = None, what: str = "the checkpoint"
) -> Iterator[Path]:
    """Collective: yield ``OUT.partial`` to write into; publish it as ``OUT`` at the end.

    Every rank of the default process group enters and leaves together. An ``OUT`` that
    already exists is replaced only once the new directory is complete, and only when
    ``refuse`` (if given) finds no reason against it; its reason is raised on every rank
    before anything is written. A full disk while writing is one CheckpointError naming
    the partial directory and ``what`` was being written.
    """
    out = Path(out)
    partial = _partial(out)
    rank = dist.get_rank()
    problem = None
    if rank == 0:
        try:
            problem = _problem_before(out, refuse)
        except OSError as error:
            problem = f"{out}: cannot be prepared for writing ({error})"
    _agreed(problem)
    try:
        yield partial
        dist.barrier()
        problem = None
        if rank == 0:
            try:
                _replace(partial, out)
            except OSError as error:
                problem = f"{out}: could not be published ({error})"
        _agreed(problem)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if rank == 0 and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        if _is_disk_full(error):
            raise CheckpointError(
                f"{partial}: no space left on the device while writing {what}; nothing was "
                "published"
            ) from None
        raise
