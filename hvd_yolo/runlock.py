"""One training run per output folder: rank 0 holds an exclusive lock on ``<out_dir>/.lock``.

``fcntl.flock`` is released by the kernel when the holder exits or dies (``kill -9``
included), so a stale lock cannot outlive its run. The file names the holder (host, pid, start
time) for the error a second run prints. Linux NFS clients map ``flock`` onto NFS byte-range
locks, so the lock also holds between nodes sharing the folder.

Holding the lock, rank 0 also checks how the run starts (:func:`check_start`, when the train
command said so with :func:`expect_start`): a new run never reuses a folder that holds an
earlier run's checkpoints unless ``--fresh`` asks to start over, and ``--resume auto`` with
nothing to resume says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
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
        if _START is not None and os.environ.get("HOROVOD_ELASTIC", "0") in ("", "0"):
            try:  # (elastic: a restarted rank 0 would find this run's own checkpoints)
                check_start(self.path.parent, *_START)
            except OutDirError:
                self.release()
                raise

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


# (resume, fresh) of the train command, set by expect_start; None: no start check (library use).
_START: tuple[str | None, bool] | None = None
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_TEMP_FILE = re.compile(r"^\.(step-\d+|last|best)\.pt\..+\.tmp$")
# What --fresh removes: the earlier run's checkpoints and logs (never anything else).
_RUN_FILES = ("last.pt", "best.pt", "best.json")


def expect_start(resume: str | None, fresh: bool) -> None:
    """How the train command starts this run (``--resume``, ``--fresh``); :meth:`OutDirLock.acquire`
    checks it against the folder (:func:`check_start`)."""
    global _START
    _START = (resume, fresh)


def check_start(out_dir: Path, resume: str | None, fresh: bool) -> None:
    """Rank 0, holding the lock: refuse a new run (no ``--resume``) in a folder holding an
    earlier run's checkpoints, naming its last step, unless ``fresh`` (then remove them and the
    earlier logs, saying so); say when ``--resume auto`` finds nothing to resume."""
    ckpt_dir = out_dir / "checkpoints"
    names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
    steps = sorted((ckpt_dir / n for n in names if _STEP_FILE.match(n)),
                   key=lambda p: p.stat().st_mtime_ns)
    finished = steps + ([ckpt_dir / "last.pt"] if "last.pt" in names else [])
    temps = [ckpt_dir / n for n in names if _TEMP_FILE.match(n)]
    last = _last_step(steps)
    if resume is None and finished and not fresh:
        raise OutDirError(
            f"run.out_dir={out_dir} holds the checkpoints of an earlier run (last step {last}, "
            f"{ckpt_dir}): continue it with --resume auto, start over with --fresh (deletes "
            "them), or give this run another run.out_dir")
    if resume is None and fresh and finished:
        removed = [*steps, *(ckpt_dir / n for n in _RUN_FILES if n in names)]
        logs = [out_dir / "metrics.jsonl", *sorted((out_dir / "ranks").glob("rank*.jsonl"))]
        for path in [*removed, *logs]:
            path.unlink(missing_ok=True)
        print(f"--fresh: removed the earlier run's {len(removed)} checkpoint file(s) (last step "
              f"{last}) and logs from {out_dir}; starting from step 0", flush=True)
    if resume == "auto" and not finished:
        why = (f"only {len(temps)} unfinished checkpoint write(s) of a killed run "
               f"({', '.join(p.name for p in temps)}): that save never completed"
               if temps else "none was written there")
        print(f"hvd-yolo train: warning: --resume auto: no checkpoint to resume in {ckpt_dir} "
              f"({why}); starting a new run from step 0", file=sys.stderr, flush=True)


def _last_step(steps: list[Path]) -> str:
    """The step number of the most recently written step file ('?' when there is none)."""
    if not steps:
        return "?"
    m = _STEP_FILE.match(steps[-1].name)
    return str(int(m.group(1))) if m else "?"
