"""Progress of long commands: a tqdm bar on a terminal, plain lines in a log.

``progress_bar`` returns tqdm when its stream (stderr) is a terminal; otherwise (a pipe, a
file, a rank under mpirun) a :class:`LineProgress` that prints one complete line every
``interval`` seconds and one at the end, so a log holds no carriage-return updates. Both take
tqdm's calls used here: iteration, ``update``, ``set_postfix``, ``close``, ``with``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

DEFAULT_INTERVAL_S = 20.0
INTERVAL_ENV = "HVD_YOLO_PROGRESS_INTERVAL"  # seconds between lines when not on a terminal


def interval_s() -> float:
    """Seconds between progress lines in a log (``HVD_YOLO_PROGRESS_INTERVAL``, default 20)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class LineProgress:
    """tqdm's interface, printing ``desc: n/total unit (p%), rate, elapsed, postfix`` lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0,
                 interval: float | None = None, file: IO[str] | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.interval = interval_s() if interval is None else interval
        self.file = file
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self.printed: int | None = None  # the count the last line showed

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        text = (f"{self.desc}: {done} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"{elapsed:.0f} s")
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self, now: float | None = None) -> None:
        self.printed = self.n
        print(self.line(now), file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        """The closing line (unless the last line already showed the final count)."""
        if not self.closed:
            self.closed = True
            if self.printed != self.n:
                self._print()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: IO[str] | None = None,
                 interval: float | None = None) -> Any:
    """tqdm when ``file`` (default stderr) is a terminal, else :class:`LineProgress`."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        interval=interval, file=file)


def wrote_line(folder: str | Path, names: Iterable[str]) -> str:
    """A command's last line: ``wrote FOLDER: a, b, c`` naming those of ``names`` that exist."""
    folder = Path(folder)
    made = [n for n in names if (folder / n).exists()]
    return f"wrote {folder}: {', '.join(made) if made else 'nothing'}"
