"""Checkpoints and evaluations at the loop's ends: :func:`save_checkpoint` (every rank: the
ranks are made to hold the same model, then rank 0 writes), :func:`end_epoch` (evaluate when
due, which saves first, else save) and :func:`finish` (the summary, the watch and lock)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hvd_yolo import checkpoint, plots
from hvd_yolo.comm import state as comm_state
from hvd_yolo.data.workers import stop_workers
from hvd_yolo.evaluate import evaluate
from hvd_yolo.loop import events
from hvd_yolo.loop.run import Parts, Progress, World


def checkpoint_state(parts: Parts, world: World, progress: Progress, epoch: int,
                     batches_done: int) -> dict[str, Any]:
    """What rank 0 writes after ``batches_done`` batches of ``epoch``."""
    if batches_done:  # the sampler counts from where this epoch's iteration started
        sampler_state = world.sampler.state_dict(
            (batches_done - progress.first) * parts.cfg.optim.batch_size)
    else:
        sampler_state = {**world.sampler.state_dict(0), "epoch": epoch, "offset": 0}
    return {
        "model": parts.model.state_dict(), "ema": parts.ema.state_dict() if parts.ema else None,
        "optimizer": parts.sync.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.use_amp else None,
        "epoch": epoch, "step": progress.step, "best_map": progress.best_map,
        "sampler": sampler_state, "config": parts.cfg.to_dict(),
        "world_size": world.ctx.size, "class_names": parts.train_ds.class_names,
        "category_ids": parts.train_ds.category_ids, "model_name": parts.cfg.model.name,
    }


def save_checkpoint(parts: Parts, world: World, progress: Progress, epoch: int,
                    batches_done: int) -> Path | None:
    """Rank 0 writes a checkpoint after ``batches_done`` batches of ``epoch`` (every rank
    calls it: the ranks are made to hold the same model first); returns its path on rank 0."""
    world.watch.progress("averaging BatchNorm statistics, writing a checkpoint", progress.step)
    # Horovod: BatchNorm running statistics (model and EMA) averaged over ranks; local SGD:
    # weights, buffers, optimizer state and EMA (every rank holds the model it saves).
    parts.sync.before_save(parts.model, parts.ema_model)
    events.emit("save", model=parts.model, step=progress.step, epoch=epoch)
    # Every rank: its communication state (PowerSGD, local SGD) beside the checkpoint, first.
    record = comm_state.save(parts.sync, parts.ckpt_dir, progress.step, world.ctx)
    if not world.ctx.is_root:
        return None
    state = checkpoint_state(parts, world, progress, epoch, batches_done)
    path = checkpoint.save({**state, "comm_state": record}, parts.ckpt_dir, progress.step,
                           parts.cfg.run.keep_last)
    comm_state.prune(parts.ckpt_dir)
    return path


def evaluate_epoch(parts: Parts, world: World, progress: Progress, epoch: int) -> dict[str, Any]:
    """Save, then evaluate the saved model on every rank; rank 0 logs and records best.pt."""
    # Saved before evaluating (a failing evaluation loses no epoch), with the BN statistics
    # averaged over ranks, so every rank evaluates the model the checkpoint holds.
    path = save_checkpoint(parts, world, progress, epoch + 1, 0)
    last = epoch + 1 == parts.cfg.optim.epochs or progress.done  # the last one draws its figures
    figures = evaluate(parts.ema_model or parts.model, parts.eval_loader, parts.val_ds,
                       parts.cfg, world.ctx.device, watch=world.watch, step=progress.step,
                       plots_dir=parts.out_dir / "plots" if last else None)
    is_best = figures["mAP"] > progress.best_map
    progress.best_map = max(progress.best_map, figures["mAP"])
    parts.log.write({"type": "eval", "step": progress.step, "epoch": epoch,
                     **{k: figures.get(k) for k in ("mAP", "mAP50", "AP_small", "AP_medium",
                                                    "AP_large", "per_class_AP")}})
    if world.ctx.is_root:
        print(f"epoch {epoch}: mAP@0.5:0.95 {figures['mAP']:.4f}  mAP@0.5 {figures['mAP50']:.4f}",
              flush=True)
        plots.training_figures(parts.out_dir, figures)  # results.png from metrics.jsonl
    if is_best and path is not None:
        checkpoint.record_best(parts.ckpt_dir, path, figures, progress.step)
    return figures


def end_epoch(parts: Parts, world: World, progress: Progress, epoch: int,
              batches_done: int) -> dict[str, Any] | None:
    """After an epoch's loop (whole, or cut by run.max_steps): evaluate when due (which saves
    first), else save; returns the evaluation's figures, or None."""
    cfg = parts.cfg
    epoch_done = batches_done >= world.plan.batches_per_epoch
    last_epoch = epoch + 1 == cfg.optim.epochs or progress.done
    figures = None
    if parts.eval_loader is not None and epoch_done and (
            (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0) or last_epoch):
        figures = evaluate_epoch(parts, world, progress, epoch)
    else:
        save_checkpoint(parts, world, progress, epoch + 1 if epoch_done else epoch,
                        0 if epoch_done else batches_done)
    # the next logged img/s counts training only, not this evaluation or save
    progress.t_last, progress.images_since = time.perf_counter(), 0
    return figures


def finish(parts: Parts, world: World, progress: Progress, figures: dict[str, Any] | None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's summary (logged, returned); the workers, the stall watch and the out_dir
    released."""
    summary = {"steps": progress.step, "stopped": progress.stopped, **(extra or {}),
               "mAP": figures["mAP"] if figures else None,
               "mAP50": figures["mAP50"] if figures else None, "best_mAP": progress.best_map,
               "out_dir": str(parts.out_dir), "checkpoint": str(parts.ckpt_dir / "last.pt")}
    parts.log.write({"type": "summary", "step": progress.step, **summary})
    stop_workers(parts.loader, parts.eval_loader)
    world.watch.close()
    if parts.lock is not None:
        parts.lock.release()
    return summary
