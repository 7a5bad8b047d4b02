"""What the loop writes as it goes: rank 0's metrics log, each rank's step log, the stop
signals it listens to."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any


class StopRequest:
    """SIGTERM/SIGUSR1 (Slurm's time limit or preemption) asks for a checkpoint and a clean
    exit. The flag is combined over ranks every step, so all ranks stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class MetricsLog:
    """Rank 0's JSON-lines log (``metrics.jsonl``) and optional TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard=true needs the tensorboard package "
                                   "(.venv/bin/pip install tensorboard)") from exc
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])


def rank_log_path(out_dir: Path, rank: int) -> Path:
    """Each rank's step log: one line per optimizer step (its samples, its loss)."""
    return out_dir / "ranks" / f"rank{rank}.jsonl"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
