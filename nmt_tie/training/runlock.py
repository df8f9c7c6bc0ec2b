"""One training per run directory: an advisory lock held by the process that writes it.

Two trainings writing one `save_dir` (a rerun while the first still runs, a job submitted
twice) would overwrite each other's checkpoints. `flock` locks belong to the open file, so
the kernel releases them when their process dies, however it dies: a lock left by a killed
run is simply taken over. Linux NFS clients map `flock` to byte-range locks that every
client sees, so the lock also holds across nodes sharing the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from nmt_tie.errors import UserError

LOCK_NAME = ".lock"


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        """Hold the lock, or raise a one-line error naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open as long as the lock)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise UserError(
                f"{self.path.parent} is in use by another training ({holder}); wait for it to "
                "end or stop it, or give this run another save_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say who it is"
