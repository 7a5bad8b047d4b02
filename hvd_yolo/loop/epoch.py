"""One epoch on every rank: its optimizer steps (``step.take_step``) from ``progress.first``
until the epoch's end, ``run.max_steps`` or a stop request; after each step the rank log, the
averaged loss (every ``run.log_every`` steps), a checkpoint when due and the driver's
``after_step``; at the end the ranks meet and the replaced corrupt samples are counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from hvd_yolo.comm import horovod as dist
from hvd_yolo.data.workers import start_workers
from hvd_yolo.loop import events
from hvd_yolo.loop.logs import append_jsonl
from hvd_yolo.loop.run import Parts, Progress, World
from hvd_yolo.loop.save import save_checkpoint
from hvd_yolo.loop.step import Window, take_step, train_mode
from hvd_yolo.progress import progress_bar as progress_lines


def log_step(parts: Parts, world: World, progress: Progress, values: torch.Tensor, epoch: int,
             size: int, bar: Any) -> None:
    """Rank 0 logs the step's loss parts averaged over ranks (every rank calls it)."""
    # Horovod: the step's (loss, box, obj, cls) averaged over ranks.
    avg = dist.allreduce_mean(values, name="hvd_yolo.train.metrics").tolist()
    now = time.perf_counter()
    img_s = progress.images_since * world.ctx.size / max(now - progress.t_last, 1e-9)
    progress.t_last, progress.images_since = now, 0
    sent = parts.sync.bytes_sent  # PowerSGD, local SGD: rank 0's allreduce payload
    parts.log.write({"type": "step", "step": progress.step, "epoch": epoch, "lr": progress.lr,
                     "size": size, "loss": avg[0], "box": avg[1], "obj": avg[2], "cls": avg[3],
                     "img_s": img_s, **({"bytes_sent": sent} if sent is not None else {})})
    if bar is not None:
        bar.set_postfix(loss=f"{avg[0]:.3f}", box=f"{avg[1]:.3f}", obj=f"{avg[2]:.3f}",
                        cls=f"{avg[3]:.3f}", lr=f"{progress.lr:.2e}", img_s=f"{img_s:.1f}",
                        size=size)


def after_step(parts: Parts, world: World, progress: Progress, epoch: int, window: Window,
               bar: Any) -> None:
    """The step's rank-log line and, when due, its logged loss."""
    cfg = parts.cfg
    # The step's loss is its window's mean (the loss its gradient belongs to).
    values = (window.sums / cfg.optim.accumulate).cpu()
    record = {"step": progress.step, "epoch": epoch, "size": window.size,
              "loss": values[0].item(), "samples": window.samples}
    append_jsonl(world.rank_log, record | ({"world_id": world.world_id} if world.world_id else {}))
    events.emit("step", step=progress.step, epoch=epoch, loss=record["loss"])
    if (cfg.run.log_every and progress.step % cfg.run.log_every == 0) or (
            progress.step == world.plan.stop_at):
        log_step(parts, world, progress, values, epoch, window.size, bar)
    if bar is not None:
        bar.update(cfg.optim.accumulate)


def progress_bar(parts: Parts, world: World, progress: Progress, epoch: int) -> Any:
    if not (world.ctx.is_root and parts.cfg.run.progress):
        return None
    # tqdm on a terminal, else a line per interval (no carriage returns in a log)
    return progress_lines(total=world.plan.batches_per_epoch, initial=progress.first,
                          desc=f"epoch {epoch}", unit="batch")


def count_corrupt(parts: Parts, world: World, progress: Progress, epoch: int,
                  corrupt: int) -> None:
    """The epoch's replaced corrupt samples, summed over ranks (each was named on stderr)."""
    # Horovod: one allreduce
    corrupt = int(dist.allreduce_sum(float(corrupt), "hvd_yolo.train.corrupt").item())
    if corrupt:
        parts.log.write({"type": "data", "step": progress.step, "epoch": epoch,
                         "corrupt_skipped": corrupt})
        if world.ctx.is_root:
            print(f"epoch {epoch}: {corrupt} corrupt sample(s) skipped and replaced "
                  f"(data.on_corrupt=skip; named above); check the data with "
                  f"`hvd-yolo shards verify {parts.cfg.data.train}`", flush=True)


def run_epoch(parts: Parts, world: World, progress: Progress, epoch: int,
              on_step: Callable[[int, int], None] | None = None) -> int:
    """Train ``epoch`` from batch ``progress.first``; returns the number of the epoch's batches
    done. ``on_step(epoch, batches_done)`` runs after every step (elastic runs commit there)."""
    cfg, acc = parts.cfg, parts.cfg.optim.accumulate
    parts.loader.sampler.set_epoch(epoch)  # keeps a resumed offset for the resumed epoch
    bar = progress_bar(parts, world, progress, epoch)
    train_mode(parts.model, cfg.model.freeze_bn)
    batches = start_workers(parts.loader)  # no stop signal reaches a worker before it ignores them
    done, corrupt = progress.first, 0  # a checkpoint at the epoch's last batch: nothing left
    for first in range(progress.first, world.plan.batches_per_epoch, acc):
        window = take_step(parts, world, progress, epoch, batches, first)
        done, corrupt = first + acc, corrupt + window.corrupt
        after_step(parts, world, progress, epoch, window, bar)
        progress.done = progress.step >= world.plan.stop_at
        if progress.stopped or (cfg.run.checkpoint_every
                                and progress.step % cfg.run.checkpoint_every == 0):
            save_checkpoint(parts, world, progress, epoch, done)
        if on_step is not None:
            on_step(epoch, done)
        if progress.stopped or progress.done:
            break
    if bar is not None:
        bar.close()
    world.watch.progress(f"waiting for the other ranks at the end of epoch {epoch}", progress.step)
    parts.sync.settle()  # overlapped local SGD: no allreduce of ours in flight across the join
    dist.join()  # Horovod: guard: every rank has finished the epoch's collectives
    count_corrupt(parts, world, progress, epoch, corrupt)
    return done
