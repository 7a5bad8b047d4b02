"""Each rank's communication state (``GradSync.comm_state_dict``: PowerSGD's error feedback
and Q, local SGD's count) beside the checkpoint: one file per rank and step, written before
rank 0's checkpoint that names them, read back on a resume over the same world size.

Files: ``<ckpt_dir>/comm/step-<step>.rank<r>.pt``, plain tensors (``torch.load`` with
``weights_only=True``), sealed like the checkpoints (``checkpoint.atomic_save``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from hvd_yolo import checkpoint
from hvd_yolo.comm import horovod
from hvd_yolo.comm.base import GradSync

FOLDER = "comm"
_FILE = re.compile(r"^step-(\d+)\.rank\d+\.pt$")


def rank_file(ckpt_dir: Path, step: int, rank: int) -> Path:
    return Path(ckpt_dir) / FOLDER / f"step-{step:08d}.rank{rank}.pt"


def save(sync: GradSync, ckpt_dir: Path, step: int, ctx: horovod.DistContext
         ) -> dict[str, int] | None:
    """Every rank: write this rank's state, then wait for every rank's (so the checkpoint rank 0
    writes next never names a missing file). Returns the checkpoint's record of them (the same
    on every rank), or None for a GradSync without state (no file, no collective)."""
    state = sync.comm_state_dict()
    if not state:
        return None
    checkpoint.atomic_save(state, rank_file(ckpt_dir, step, ctx.rank))
    horovod.barrier()  # Horovod: every rank's file is on disk before the checkpoint
    return {"step": step, "world_size": ctx.size}


def prune(ckpt_dir: Path) -> None:
    """Rank 0, after a checkpoint: remove the files of steps whose checkpoint is gone (pruned
    to ``run.keep_last``, or never written by a killed run) and killed writes' temp files."""
    folder = Path(ckpt_dir) / FOLDER
    kept = {p.name.removeprefix("step-").removesuffix(".pt") for p in checkpoint.step_files(ckpt_dir)}
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _FILE.match(p.name)
        if (m and m.group(1) not in kept) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any]:
    """One rank's file, verified, as plain tensors (raises ``checkpoint.CheckpointError``)."""
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{path}: no such file")
    checkpoint.verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise checkpoint.CheckpointError(f"{path}: cannot be read ({exc})") from exc


def load(sync: GradSync, record: dict[str, int] | None, ckpt_dir: Path,
         ctx: horovod.DistContext) -> bool:
    """Every rank, on a resume: continue the communication state the checkpoint's ``record``
    names when this run has its world size and every rank reads its file; otherwise every rank
    restarts it (one decision: PowerSGD's Q must be the same everywhere), with a warning that
    says why. Returns whether it continued."""
    if not sync.comm_state_dict():
        return False
    if record is None or record["world_size"] != ctx.size:  # the same record on every rank
        if ctx.is_root:
            restart_warning(sync, "the checkpoint holds none" if record is None else
                            f"the checkpoint's is of {record['world_size']} ranks, this run has "
                            f"{ctx.size}")
        sync.reset_comm_state()
        return False
    why, state = None, None
    try:
        state = read(rank_file(ckpt_dir, record["step"], ctx.rank))
    except checkpoint.CheckpointError as exc:
        why = f"rank {ctx.rank}: {exc}"
    # Horovod: the ranks that could not read theirs, counted everywhere
    failed = int(horovod.allreduce_sum(float(why is not None), "hvd_yolo.comm.state").item())
    if failed == 0:
        sync.load_comm_state_dict(state)
        return True
    if why is not None or ctx.is_root:
        restart_warning(sync, why or f"{failed} rank(s) could not read theirs")
    sync.reset_comm_state()
    return False


def restart_warning(sync: GradSync, why: str) -> None:
    warnings.warn(f"{type(sync).__name__}'s communication state (error feedback, warm start, "
                  f"counts) restarts from zero: {why}", stacklevel=2)
