"""End a job whose ranks stopped making progress (a frozen, deadlocked or lost rank), by name.

Horovod's stall inspector names the ranks that did not submit a tensor, but it runs in the
coordinator's background loop, and with the MPI controller that loop blocks inside MPI as soon
as one rank's process is frozen (SIGSTOP, a hung node): nothing reports and the job hangs
forever. So every rank runs a :class:`StallWatch` thread over the training loop's progress marks:

- after ``warning_s`` without progress the rank warns (saying what its main thread waits for)
  and leaves a note ``stall-rank<R>.json`` in a folder every rank writes (the run's ``ranks/``);
- after ``shutdown_s`` the lowest rank that left a note reads the notes, names the ranks that
  left none (they did not respond: frozen or lost) and exits 1, which makes the launcher end
  every rank; the other ranks exit ``grace_s`` later if the launcher has not ended them yet.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


class StallWatch:
    """A watchdog thread for one rank; the main thread calls :meth:`progress` as it goes."""

    def __init__(self, folder: Path, rank: int, size: int, warning_s: float, shutdown_s: float,
                 grace_s: float = 10.0) -> None:
        self.folder, self.rank, self.size = Path(folder), rank, size
        self.warning_s, self.shutdown_s, self.grace_s = warning_s, shutdown_s, grace_s
        self.note = self.folder / f"stall-rank{rank}.json"
        self.note.unlink(missing_ok=True)  # a note of an earlier run
        self._last, self._where, self._step, self._warned = time.monotonic(), "starting", 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hvd_yolo.stall", daemon=True)
        if warning_s > 0:
            self._thread.start()

    def progress(self, where: str, step: int) -> None:
        """Progress was made; ``where`` says what this rank does next (shown if it stalls)."""
        self._last, self._where, self._step = time.monotonic(), where, step
        if self._warned:
            self._warned = False
            self.note.unlink(missing_ok=True)
            print(f"rank {self.rank}: progress again at step {step}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self.note.unlink(missing_ok=True)

    def _watch(self) -> None:
        period = min(1.0, self.warning_s / 4)
        tick = time.monotonic()
        while not self._stop.wait(period):
            now = time.monotonic()
            gap, tick = now - tick - period, now
            if gap > max(5 * period, 5.0):  # this thread did not run: the process was stopped
                # (SIGSTOP, a suspended VM): its own pause is no other rank's stall
                self._last = min(self._last + gap, now)
                print(f"rank {self.rank}: this process was stopped for {gap:.0f} s (SIGSTOP, or "
                      "a suspended machine) and runs again; that time is not counted as a stall",
                      file=sys.stderr, flush=True)
            idle = time.monotonic() - self._last
            if idle >= self.warning_s and not self._warned:
                self._warned = True
                self._write_note(idle)
                print(f"hvd-yolo train: warning: rank {self.rank}: no progress for {idle:.0f} s at "
                      f"step {self._step} ({self._where}); dist.stall_shutdown_s="
                      f"{self.shutdown_s:g} ends the job", file=sys.stderr, flush=True)
            if self.shutdown_s and idle >= self.shutdown_s:
                notes = self._read_notes()
                reporter = min(notes) if notes else self.rank
                if self.rank == reporter or idle >= self.shutdown_s + self.grace_s:
                    print("hvd-yolo train: error: " + self.report(notes, idle), file=sys.stderr,
                          flush=True)
                    os._exit(1)  # the launcher (mpirun/horovodrun) then ends every rank

    def report(self, notes: dict[int, dict], idle: float) -> str:
        """The error: which ranks did not respond, and where the others wait."""
        silent = [r for r in range(self.size) if r not in notes]
        waiting = "; ".join(f"rank {r} at step {n['step']}: {n['where']}"
                            for r, n in sorted(notes.items()))
        who = (f"rank(s) {', '.join(map(str, silent))} did not respond (frozen, or lost: no stall "
               f"report from them)" if silent else "every rank responded (none is frozen)")
        return (f"no progress for {idle:.0f} s (dist.stall_shutdown_s={self.shutdown_s:g}): {who}; "
                f"{waiting}. Ending the job; resume with --resume auto")

    def _write_note(self, idle: float) -> None:
        tmp = self.note.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"rank": self.rank, "step": self._step,
                                       "where": self._where, "idle_s": round(idle, 1)}))
            tmp.replace(self.note)
        except OSError as exc:
            print(f"rank {self.rank}: cannot write {self.note}: {exc}", file=sys.stderr, flush=True)

    def _read_notes(self) -> dict[int, dict]:
        notes = {}
        for r in range(self.size):
            try:
                notes[r] = json.loads((self.folder / f"stall-rank{r}.json").read_text())
            except (OSError, ValueError):
                continue
        return notes
