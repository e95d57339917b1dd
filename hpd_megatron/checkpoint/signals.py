"""Stop signals: every rank agrees at a step boundary, saves, and exits for a requeue.

Slurm sends a signal some time before the limit (``--signal=B:USR1@300``) or on
preemption (SIGTERM). The handler only records it: nothing is interrupted mid-step or
mid-save, so a second signal during the save changes nothing. At each step boundary
the ranks all-reduce their flags, so a signal delivered to one rank stops all of them
at the same step.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from hpd_megatron.errors import ConfigError
from hpd_megatron.parallel.collectives import any_rank

# EX_TEMPFAIL: "try again later". The Slurm templates requeue the job on this code.
STOP_EXIT_CODE = 75


class StopRequested(Exception):
    """Raised after the checkpoint of ``step`` is complete; the CLI exits with STOP_EXIT_CODE."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by a signal after step {step}; the checkpoint is complete")
        self.step = step


class StopSignals:
    def __init__(self, names: Sequence[str]) -> None:
        self.received = False
        self._previous = {}
        for name in names:
            number = getattr(signal, name, None)
            if not isinstance(number, signal.Signals):
                raise ConfigError(f"checkpoint.stop_signals: unknown signal {name!r}")
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, _signum: int, _frame: object) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank received a stop signal."""
        return any_rank(self.received)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.restore()
