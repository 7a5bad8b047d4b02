"""What a stop signal (SIGTERM/SIGUSR1) can save under the launcher that started this rank.

Measured with Open MPI 4.1: a SIGTERM to ``mpirun`` sends the ranks SIGCONT at once, SIGTERM
``odls_base_sigkill_timeout`` seconds later (default 1) and SIGKILL as long again after that.
Under a bare ``mpirun`` a rank therefore has about one second between the SIGTERM and the
SIGKILL: a checkpoint due at the next step boundary is usually lost, and the save it started
leaves a temp file. ``mpi/mpirun.sh`` (which sets ``HVD_YOLO_LAUNCH``) instead forwards the
signal as SIGUSR1, which ``mpirun`` passes to every rank at once, and gives them
``--term-grace`` seconds. :func:`launch_warning` names the risk at start; :func:`announce_stops`
makes rank 0 print, when the signal arrives, the step, the last checkpoint on disk and so what a
kill before the next checkpoint loses.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

# Seconds between mpirun's SIGTERM and its SIGKILL from which a step and a save usually fit.
SAFE_GRACE_S = 10
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_AVOID = ("launch with mpi/mpirun.sh (add --term-grace SECONDS for a long step), or give "
          "mpirun --mca odls_base_sigkill_timeout 60")


def bare_mpirun_grace() -> float | None:
    """Seconds between mpirun's SIGTERM and SIGKILL when a plain ``mpirun`` (not
    ``mpi/mpirun.sh``) started this rank with less than :data:`SAFE_GRACE_S`; else None."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ or os.environ.get("HVD_YOLO_LAUNCH"):
        return None
    try:
        grace = float(os.environ.get("OMPI_MCA_odls_base_sigkill_timeout", "1"))
    except ValueError:
        grace = 1.0
    return grace if grace < SAFE_GRACE_S else None


def launch_warning() -> str | None:
    """The start-up warning for a bare ``mpirun`` launch (None when a stop signal is safe)."""
    grace = bare_mpirun_grace()
    if grace is None:
        return None
    return (f"hvd-yolo train: warning: started by a plain mpirun: on SIGTERM (a scheduler's time "
            f"limit, a kill) Open MPI kills the ranks {grace:g} s after signalling them, "
            f"usually before the checkpoint of the next step is written, and the steps since "
            f"the last checkpoint are lost. To stop with a checkpoint, {_AVOID}")


def last_saved_step(ckpt_dir: Path) -> int | None:
    """The step of the most recently written ``step-N.pt`` in ``ckpt_dir`` (None: none)."""
    try:
        found = [(p.stat().st_mtime_ns, int(m.group(1))) for p in ckpt_dir.iterdir()
                 if (m := _STEP_FILE.match(p.name))]
    except OSError:
        return None
    return max(found)[1] if found else None


def last_step(rank_log: Path) -> int | None:
    """The last optimizer step this rank logged (its ``ranks/rankN.jsonl``), else None."""
    try:
        with rank_log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def stop_note(signame: str, out_dir: Path, rank_log: Path) -> str:
    """Rank 0's line when a stop signal arrives: where the run is, what is on disk, and (bare
    mpirun) what a kill before the next checkpoint loses."""
    step, saved = last_step(rank_log), last_saved_step(out_dir / "checkpoints")
    at = f"after step {step}" if step is not None else "before the first step"
    disk = (f"the last checkpoint on disk is step {saved}" if saved is not None
            else "no checkpoint is on disk yet")
    text = (f"hvd-yolo train: {signame} {at}: every rank stops at the next step boundary and "
            f"rank 0 writes a checkpoint; {disk}")
    grace = bare_mpirun_grace()
    if grace is not None:
        lost = ("every step so far" if saved is None else
                f"the steps after {saved}" if step is None or step > saved else "nothing")
        text += (f". Plain mpirun kills the ranks {grace:g} s after this signal: if that comes "
                 f"first, {lost} is lost (--resume auto then starts from "
                 f"{'step 0' if saved is None else f'step {saved}'}); next time, {_AVOID}")
    return text


def announce_stops(out_dir: Path, rank_log: Path, rank: int) -> None:
    """On rank 0: print :func:`launch_warning` now, and :func:`stop_note` when SIGTERM/SIGUSR1
    arrives, before the handler that was installed (the training loop's stop request) runs."""
    if rank != 0:
        return
    warning = launch_warning()
    if warning:
        os.write(2, (warning + "\n").encode())
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        previous = signal.getsignal(sig)

        def handle(signum: int, frame: Any, previous: Any = previous) -> None:
            try:  # os.write: no buffered stream is re-entered from a signal handler
                note = stop_note(signal.Signals(signum).name, out_dir, rank_log)
                os.write(2, (note + "\n").encode())
            except OSError:
                pass
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handle)
