"""The shared wrapper of every entry point: bad input is one line, printed once per job.

    if __name__ == "__main__":
        run_cli(main)

``main`` returns an exit code (or None for 0). An ``HpdError`` becomes ``error: MESSAGE``
on stderr and exit code 1; a stop request (a signal, see ``checkpoint/signals.py``) exits
with the requeue code. Any other exception is a bug and keeps its traceback.

Under torchrun or srun every rank meets the same bad input and would print the same line;
the first rank to claim a marker file (keyed by the job and the message) prints it, the
others exit quietly with the same code. A message that differs between ranks is printed
by each of them. The launcher's own report of the failed ranks still follows.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from hpd_megatron.errors import HpdError

BAD_INPUT_EXIT_CODE = 1


def _job_key() -> str | None:
    """What identifies this launch on every rank, or None for a single process."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
        return None
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(name):
            step = os.environ.get("SLURM_STEP_ID", "")
            return f"{name}={os.environ[name]}.{step}"
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def first_to_report(message: str) -> bool:
    """True on exactly one process of this job for this message (per host)."""
    key = _job_key()
    if key is None:
        return True
    digest = hashlib.sha256(f"{key}\n{message}".encode()).hexdigest()[:32]
    markers = Path(tempfile.gettempdir()) / f"hpd-megatron-reported-{os.getuid()}"
    markers.mkdir(exist_ok=True)
    try:
        os.close(os.open(markers / digest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` and exit with its code; report the project's errors in one line."""
    from hpd_megatron.checkpoint.signals import STOP_EXIT_CODE, StopRequested

    try:
        code = main()
    except HpdError as error:
        message = f"error: {error}"
        if first_to_report(message):
            print(message, file=sys.stderr, flush=True)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except StopRequested as stopped:
        print(stopped, flush=True)
        sys.exit(STOP_EXIT_CODE)
    sys.exit(code or 0)
