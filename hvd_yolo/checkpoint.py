"""Checkpoints: written atomically by rank 0, the last k kept, the best by mAP kept apart.

Layout under ``<out_dir>/checkpoints/``: ``step-00000120.pt`` (rotating), ``last.pt`` (a copy
of the newest) and ``best.pt``. Every file is written to a temporary name in the same folder
and renamed, so a job killed mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
         is_best: bool = False) -> Path:
    """Write ``step-<step>.pt`` and ``last.pt`` (and ``best.pt``); prune to ``keep_last``."""
    path = ckpt_dir / f"step-{step:08d}.pt"
    atomic_save(state, path)
    atomic_copy(path, ckpt_dir / "last.pt")
    if is_best:
        atomic_copy(path, ckpt_dir / "best.pt")
    steps = sorted(p for p in ckpt_dir.iterdir() if _STEP_FILE.match(p.name))
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        old.unlink(missing_ok=True)
    return path


def resolve(resume: str, out_dir: str | Path) -> Path | None:
    """``auto`` -> ``<out_dir>/checkpoints/last.pt`` if it exists, else None; a path -> itself."""
    if resume == "auto":
        last = Path(out_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (tensors are moved to the device by their owners)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_model(path: str | Path, use_ema: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint (EMA weights when present and asked for).

    Returns ``(model in eval mode on the CPU, checkpoint dict)``.
    """
    from hvd_yolo.model.yolov3 import build_model

    state = load(Path(path))
    for key in ("model", "class_names", "model_name"):
        if key not in state:
            raise ValueError(f"{path}: not an hvd-yolo training checkpoint (no {key!r} entry)")
    model = build_model(state["model_name"], len(state["class_names"]))
    weights = state["ema"]["model"] if use_ema and state.get("ema") else state["model"]
    # Checkpoints of SyncBatchNorm runs load into plain BatchNorm: same parameter names.
    model.load_state_dict(weights)
    return model.eval(), state
