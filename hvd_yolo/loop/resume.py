"""The one resume path: rank 0 finds, verifies, checks and loads ``--resume``'s checkpoint
(:func:`read_checkpoint`); the fixed driver then hands it to every rank by broadcasts
(:func:`resume`), the elastic one by its state's first sync."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from hvd_yolo import checkpoint
from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm import state as comm_state
from hvd_yolo.data.sampler import ShardSampler
from hvd_yolo.loop.run import Parts


@dataclass(frozen=True)
class Resumed:
    """The small state of the checkpoint a run resumes from (the same on every rank)."""

    path: str
    epoch: int
    step: int  # the checkpoint's optimizer step
    sampler: dict[str, Any]  # the sampler state to continue from
    best_map: float
    ema: tuple[int, float] | None  # (updates, decay)
    scaler: dict[str, Any] | None
    comm_state: dict[str, int] | None  # the per-rank communication state files' record


def read_checkpoint(resume: str, parts: Parts, world_size: int,
                    sampler: ShardSampler) -> Resumed | None:
    """Rank 0: ``--resume``'s checkpoint (``auto`` falls back past corrupted files) into the
    model, the GradSync, the EMA and ``sampler``; None when ``auto`` finds none. Refused (a
    :class:`checkpoint.CheckpointError`): another seed, tail mode, dataset, model or classes."""
    cfg = parts.cfg
    found = checkpoint.load_resume(resume, cfg.run.out_dir)
    if found is None:
        return None
    path, state = found
    refusals, notes = checkpoint.compare_run(state, cfg.to_dict(), world_size,
                                             parts.train_ds.class_names, sampler.num_total,
                                             len(sampler.shard_sizes))
    if refusals:
        raise checkpoint.CheckpointError(
            f"cannot resume from {path}: " + "; ".join(refusals) + ". Resume with the "
            "checkpoint's values, or start a new run (another run.out_dir, no --resume)")
    for note in notes:
        warnings.warn(f"resuming from {path}: {note}", stacklevel=1)
    saved = dict(state["sampler"])
    if saved["epoch"] != state["epoch"]:  # a checkpoint taken at an epoch's end
        saved.update(epoch=state["epoch"], offset=0, legs=[])
    sampler.load_state_dict(saved)  # raises here, on rank 0, if it cannot work
    parts.model.load_state_dict(state["model"])
    parts.sync.load_state_dict(state["optimizer"])
    ema = parts.ema
    if ema is not None and state.get("ema"):
        ema.load_state_dict(state["ema"])
    elif ema is not None:  # a checkpoint of a run without EMA: start it here
        ema.ema.load_state_dict(parts.model.state_dict())
        ema.updates = 0
    # the checkpoint predates its own evaluation: best.json has that mAP
    best = max(state.get("best_map", -1.0), checkpoint.recorded_best(parts.ckpt_dir))
    return Resumed(str(path), state["epoch"], state["step"], saved, best,
                   (ema.updates, ema.decay) if ema is not None else None, state.get("scaler"),
                   state.get("comm_state"))


def read_on_root(resume: str | None, parts: Parts, ctx: dist.DistContext,
                 sampler: ShardSampler) -> tuple[Resumed | None, str | None]:
    """:func:`read_checkpoint` on rank 0; any failure becomes an error text (it must end every
    rank, not hang them)."""
    if not (ctx.is_root and resume):
        return None, None
    try:
        return read_checkpoint(resume, parts, ctx.size, sampler), None
    except checkpoint.CheckpointError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"cannot resume from {resume}: {exc}"


def resume(resume: str | None, parts: Parts, ctx: dist.DistContext,
           sampler: ShardSampler) -> Resumed | None:
    """Make every rank hold the same starting state: rank 0's fresh weights, or a checkpoint.

    Rank 0 alone reads the checkpoint; its decision, the small state and the weights,
    optimizer state and EMA reach the other ranks by broadcasts, so ranks need not see the
    file. Another world size, batch size or accumulation re-deals the epoch's unread samples
    over this run (the sampler).
    """
    found, error = read_on_root(resume, parts, ctx, sampler)
    # Horovod: rank 0's decision and the checkpoint's small state reach every rank.
    found, error = dist.broadcast_object((found, error), name="hvd_yolo.train.resume")
    if error:
        raise checkpoint.CheckpointError(error)
    # Horovod: rank 0's weights everywhere. A fresh optimizer is identical on every rank by
    # construction (Horovod's broadcast_optimizer_state would take a zero-gradient step to
    # create state, applying weight decay), so optimizer state is broadcast only on a resume.
    dist.broadcast_state(parts.model, parts.sync.optimizer if found else None)
    if found is None:
        return None
    if parts.ema is not None:
        dist.broadcast_state(parts.ema.ema)  # Horovod: the EMA weights and buffers
        parts.ema.updates, parts.ema.decay = found.ema
    if found.scaler and parts.scaler.is_enabled():
        parts.scaler.load_state_dict(found.scaler)
    if not ctx.is_root:
        sampler.load_state_dict(found.sampler)
    # Every rank: its own communication state, on the same world size (else restarted).
    comm_state.load(parts.sync, found.comm_state, parts.ckpt_dir, ctx)
    return found


def resumed_note(found: Resumed, step: int, sampler: ShardSampler) -> str:
    return (f"resumed from {found.path}: epoch {found.epoch}, step {step} "
            f"({sampler.fraction_done():.1%} of the epoch read)")

