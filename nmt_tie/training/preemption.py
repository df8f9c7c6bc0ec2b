"""Stopping on a scheduler's signal without losing work.

Slurm, Kubernetes and `docker stop` send SIGTERM some seconds before they kill a job (Slurm's
KillWait and Kubernetes' grace period are 30 s by default); Ctrl-C sends SIGINT. While
training, either only *asks* to stop: the trainer finishes the update in flight, writes
last.pt and exits with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT),
the status a shell reports for a process that the signal ended, so that a job script stops
and a requeueing scheduler reruns the same command, which resumes.

A validation (minutes of beam search on a WMT set) is the one long stretch without an update
boundary: a signal that arrives during one abandons it, and the resumed run validates that
update first. Under torchrun every worker adds its own "signal received" flag to the
statistics all-reduced after every update, so all ranks stop after the same update without a
collective of their own.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from nmt_tie.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ValidationInterrupted(Exception):
    """A stop signal arrived during validation (raised out of the signal handler)."""


class TrainingStopped(UserError):
    """Training stopped on a signal after saving; exits with 128 + the signal's number."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopSignals:
    """Catches SIGTERM and SIGINT while in use (`with StopSignals() as signals:`).

    Handlers can only be installed from the main thread; elsewhere (a test calling the
    trainer from a thread) signals keep their usual effect."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal of this process
        self._interruptible = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Nothing is printed here: a handler that writes to stderr while the interrupted code
        # writes to it fails with "reentrant call". The trainer says what happened.
        if self.received is None:
            self.received = signum
        if self._interruptible:
            self._interruptible = False
            raise ValidationInterrupted(signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Code during which a stop signal raises ValidationInterrupted at once."""
        if self.received is not None:
            raise ValidationInterrupted(self.received)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a stop signal"
