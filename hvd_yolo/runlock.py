"""One training run per output folder: rank 0 holds an exclusive lock on ``<out_dir>/.lock``.

``fcntl.flock`` is released by the kernel when the holder exits or dies (``kill -9``
included), so a stale lock cannot outlive its run. The file names the holder (host, pid, start
time) for the error a second run prints. Linux NFS clients map ``flock`` onto NFS byte-range
locks, so the lock also holds between nodes sharing the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO


class OutDirError(RuntimeError):
    """The output folder cannot be used by this run."""


class OutDirBusy(OutDirError):
    """Another run holds the output folder."""


class OutDirLock:
    """An exclusive, non-blocking lock on ``out_dir`` for the lifetime of this object's hold."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutDirBusy` naming the run that holds it
        (:class:`OutDirError` when the folder cannot be written)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = self.path.open("a+")
        except OSError as exc:
            raise OutDirError(f"run.out_dir={self.path.parent} cannot be written "
                              f"({exc.strerror}): give a folder this user can write") from exc
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise OutDirBusy(f"{self.path.parent} is in use by another training run ({describe(holder)}); "
                             "wait for it to end, or give this run another run.out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Give the lock up (process exit does the same)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def describe(holder: str) -> str:
    """``host H, pid P, started T`` from the lock file's contents (written by ``acquire``)."""
    try:
        info = json.loads(holder)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not yet recorded"
