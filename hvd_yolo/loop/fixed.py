"""The fixed-world driver: `hvd-yolo train` under ``mpirun -np N`` / ``horovodrun -np N`` (or
alone). Read top down: open the run -> build its parts -> resume -> plan -> epochs -> summary."""

from __future__ import annotations

import time
from typing import Any

from hvd_yolo import sigterm
from hvd_yolo.comm import horovod as dist
from hvd_yolo.config import Config
from hvd_yolo.loop import resume as resuming
from hvd_yolo.loop.epoch import run_epoch
from hvd_yolo.loop.plan import make_plan
from hvd_yolo.loop.run import Parts, Progress, World, build, make_sampler, open_run, open_world
from hvd_yolo.loop.save import end_epoch, finish


def announce(parts: Parts, world: World) -> None:
    """Rank 0's one line about the run."""
    cfg, ctx, plan = parts.cfg, world.ctx, world.plan
    if not ctx.is_root:
        return
    print(f"training {cfg.model.name} ({len(parts.train_ds.class_names)} classes) on {ctx.size} "
          f"rank(s), {len(parts.train_ds)} images, {plan.steps_per_epoch} steps/epoch x "
          f"{cfg.optim.epochs} epochs, global batch "
          f"{cfg.optim.batch_size * ctx.size * cfg.optim.accumulate}, lr {plan.base_lr:g}, "
          f"op {cfg.dist.op}, compression {cfg.dist.compression}, sync {cfg.dist.sync}"
          + (f" every {cfg.dist.local_steps} steps" if cfg.dist.sync == "local" else "")
          + (" (overlapped)" if cfg.dist.local_overlap else "") + "; "
          + (" ".join(f"{k}={v}" for k, v in parts.hvd_env.items()) or "Horovod defaults"),
          flush=True)


def train(cfg: Config, resume: str | None = None, timeline: str | None = None) -> dict[str, Any]:
    """Train as configured; returns the final summary (same on every rank)."""
    ctx, lock, hvd_env, watch = open_run(cfg, timeline, elastic=False)
    parts, sampler = build(cfg, ctx, lock, hvd_env, lambda ds: make_sampler(cfg, ds, ctx))
    found = resuming.resume(resume, parts, ctx, sampler)
    epoch = found.epoch if found else 0
    plan = make_plan(cfg, sampler.epoch_length(epoch + 1), len(sampler), epoch,
                     dist.lr_world_scale(cfg.dist.op, ctx.device))
    progress = Progress(step=plan.start_step, best_map=found.best_map if found else -1.0,
                        epoch=epoch, first=plan.first)
    parts.sync.start_at(progress.step)  # PowerSGD's start step, local SGD's warm-up
    world = open_world(parts, ctx, sampler, plan, watch)
    sigterm.announce_stops(parts.out_dir, world.rank_log, ctx.rank)  # what a stop signal saves
    if found and ctx.is_root:
        print(resuming.resumed_note(found, progress.step, sampler), flush=True)
    announce(parts, world)
    return finish(parts, world, progress, run_epochs(parts, world, progress))


def run_epochs(parts: Parts, world: World, progress: Progress) -> dict[str, Any] | None:
    """The epochs from ``progress.epoch``; returns the last evaluation's figures, or None."""
    progress.lr = world.plan.lr(progress.step)
    progress.done = progress.step >= world.plan.stop_at
    progress.t_last = time.perf_counter()
    figures, start = None, progress.epoch
    for epoch in range(start, parts.cfg.optim.epochs):
        if progress.done or progress.stopped:
            break
        progress.epoch = epoch
        if epoch != start:  # the resume skip is the first epoch's only
            progress.first = 0
        batches_done = run_epoch(parts, world, progress, epoch)
        if progress.stopped:
            if world.ctx.is_root:
                print(f"stop requested ({parts.stop.signal_name or 'another rank'}): checkpoint "
                      f"written at step {progress.step}; resume with --resume auto", flush=True)
            break
        figures = end_epoch(parts, world, progress, epoch, batches_done) or figures
    return figures
