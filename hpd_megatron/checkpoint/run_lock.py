"""One job per directory: an exclusive lock on a run directory or a converter's output.

Two jobs writing one run directory delete each other's saves and race on the tracker,
retention and ``mlflow.db``; two conversions to one ``--out`` clear each other's partial
output. The lock is ``fcntl.flock`` on a lock file (released by the kernel when the holder
dies, however it dies) plus a small JSON naming the holder, so a second job fails at once
with one line saying who holds it.

Taking over: a holder that is dead but still locks the file (a forked child of it lives on,
or a network filesystem has not yet noticed the client died) is taken over when it ran on
this host, or when it is this very Slurm job (a requeued job gets its old id back).

One process per job takes the lock (rank 0, before anything is written); the verdict is
broadcast so every rank exits with the same line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from hpd_megatron.errors import CheckpointError

RUN_LOCK = ".hpd-megatron.lock"


def _me() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
    }


def _describe(holder: dict) -> str:
    text = f"host {holder.get('host')}, pid {holder.get('pid')}"
    return text + (f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or an unreadable record: assume it lives
    return True


def _may_take_over(holder: dict) -> bool:
    me = _me()
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return True  # this job, requeued
    return holder.get("host") == me["host"] and not _alive(holder.get("pid"))


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class DirectoryLock:
    """The held lock on ``path`` (``acquire``); ``release`` it when the job ends."""

    def __init__(self, path: Path, descriptor: int, remove_on_release: bool) -> None:
        self.path, self.descriptor, self.remove_on_release = path, descriptor, remove_on_release

    def release(self) -> None:
        if self.descriptor < 0:
            return
        if self.remove_on_release:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)
        self.descriptor = -1


def acquire(path: Path, what: str, remove_on_release: bool = False) -> DirectoryLock:
    """Lock ``path`` (a lock file) for this process, or one CheckpointError naming the holder.

    ``what`` names the directory in the message (e.g. ``run_dir /x``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        # EWOULDBLOCK: held. ENOLCK/EOPNOTSUPP: a filesystem without flock; the holder's
        # record alone decides (docs/checkpoints.md).
        holder = _read_holder(path)
        busy = error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or (
            holder and holder.get("pid") != os.getpid()
        )
        if busy and not _may_take_over(holder):
            os.close(descriptor)
            raise CheckpointError(
                f"{what}: in use by another job ({_describe(holder)}; lock file {path}); "
                "wait for it to end, or stop it, or choose another directory"
            ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(_me()) + "\n").encode(), 0)
    return DirectoryLock(path, descriptor, remove_on_release)


def acquire_on_rank_zero(path: Path, what: str, remove_on_release: bool = False):
    """Collective: rank 0 takes the lock; every rank raises its refusal. Rank 0 gets the
    DirectoryLock, the others None."""
    lock, problem = None, None
    if dist.get_rank() == 0:
        try:
            lock = acquire(path, what, remove_on_release)
        except (CheckpointError, OSError) as error:
            problem = str(error)
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise CheckpointError(shared[0])
    return lock


def output_lock_path(out: Path) -> Path:
    """A converter's lock, beside its ``--out`` (which exists only once it is complete)."""
    return out.with_name(out.name + ".lock")


@contextmanager
def output_locked(out: str | Path) -> Iterator[None]:
    """Collective: hold the lock of a converter's ``--out`` while it is written."""
    out = Path(out)
    lock = acquire_on_rank_zero(output_lock_path(out), f"--out {out}", remove_on_release=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
