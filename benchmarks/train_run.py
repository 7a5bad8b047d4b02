"""One `hvd-yolo train` run for a benchmark: the package's mpirun line, its settings as
``--set`` options, its output kept beside the run, its metrics log read back."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvd_yolo.launch import hvd_yolo_argv, mpirun_argv


@dataclass
class TrainRun:
    records: list[dict[str, Any]]  # the run's metrics.jsonl
    stdout: str
    wall_s: float

    def last(self, kind: str) -> dict[str, Any]:
        """The last record of a type (``eval``, ``step``, ``summary``)."""
        return [r for r in self.records if r.get("type") == kind][-1]


def train_run(sets: dict[str, Any], np: int, label: str, timeout: float | None = None
              ) -> TrainRun:
    """``hvd-yolo train --set K=V ...`` on ``np`` ranks into ``sets["run.out_dir"]``; its
    output goes to ``<out_dir>.log``. A failed run raises, naming ``label``."""
    out = Path(sets["run.out_dir"])
    argv = mpirun_argv(np) + hvd_yolo_argv("train", *[f"--set={k}={v}" for k, v in sets.items()])
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{label}: hvd-yolo train failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return TrainRun(records, proc.stdout, round(wall, 1))
