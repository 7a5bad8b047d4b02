"""One optimizer step on every rank: ``optim.accumulate`` micro-batches (forward, loss,
backward: each gradient's allreduce starts in its backward hook), then the shared stop and
non-finite decision, the GradSync's communication, clipping, the update and the EMA."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hvd_yolo.comm import horovod as dist
from hvd_yolo.data.multiscale import resize_batch, size_for_step
from hvd_yolo.loop.run import Parts, Progress, World
from hvd_yolo.optim import set_lr


class NonFiniteLoss(FloatingPointError):
    """A rank's loss was NaN/inf; raised on every rank at the same step (a collective decision)."""


def nonfinite_message(bad: dict[int, int], step: int, epoch: int) -> str:
    where = ", ".join(f"rank {r} batch {b}" for r, b in sorted(bad.items()))
    return (f"the loss is not finite (NaN/inf) at step {step} (epoch {epoch}; {where} of the "
            f"rank's epoch); every rank stopped before this step's update. Lower optim.lr, or "
            f"check those batches' data; resume from the last checkpoint with --resume auto")


def train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode (running
    statistics used and kept, so a step does not depend on how its batch is split)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


@dataclass
class Window:
    """One optimizer step's micro-batches on this rank."""

    sums: torch.Tensor  # (loss, box, obj, cls) summed over the micro-batches
    samples: list[int] = field(default_factory=list)  # the sample indices read (the rank log)
    bad_batch: int | None = None  # the first batch of the step with a non-finite loss
    corrupt: int = 0  # samples that failed their CRC32/decode and were replaced
    size: int = 0  # the step's input size


def micro_batch(parts: Parts, world: World, progress: Progress, b: int,
                batch: dict[str, Any], window: Window) -> None:
    """Forward, loss and backward of batch ``b``; its figures added to ``window``."""
    cfg, device = parts.cfg, world.ctx.device
    window.corrupt += sum(m.get("corrupt", 0) for m in batch["metas"])
    window.samples += [m["index"] for m in batch["metas"]]
    window.size = (size_for_step(progress.step, cfg.run.seed, cfg.input.every, cfg.input.min_size,
                                 cfg.input.max_size) if cfg.input.multiscale else cfg.input.size)
    images = batch["images"].to(device, non_blocking=True).float().div_(255)
    images, targets = resize_batch(images, batch["targets"].to(device), window.size)
    with torch.autocast(device.type, enabled=parts.use_amp):
        outputs = parts.model(images)
    loss, part = parts.criterion([o.float() for o in outputs], targets)
    if window.bad_batch is None and not torch.isfinite(loss):
        window.bad_batch = b  # decided with the other ranks at the step (they must not hang)
    # Horovod: each gradient's allreduce starts in its backward hook.
    parts.scaler.scale(loss / cfg.optim.accumulate).backward()
    window.sums += torch.stack([loss.detach(), part["box"], part["obj"], part["cls"]])
    progress.images_since += images.shape[0]


def update(parts: Parts, world: World, progress: Progress, epoch: int, window: Window) -> None:
    """The step's communication, the shared decision, then clip, update and EMA (every rank)."""
    sync, scaler = parts.sync, parts.scaler
    world.watch.progress(f"waiting for the other ranks' gradients of step {progress.step + 1}",
                         progress.step)
    sync.synchronize()  # Horovod: this step's communication (Adasum: in step())
    # Horovod: one small allreduce decides for every rank: a stop request, a bad loss.
    progress.stopped, bad = dist.nonfinite_ranks(parts.stop.requested, window.bad_batch,
                                                 "hvd_yolo.train.decide")
    if bad:
        raise NonFiniteLoss(nonfinite_message(bad, progress.step + 1, epoch))
    scaler.unscale_(sync)  # (Adasum: AMP off, and the config refuses optim.clip_grad)
    if parts.cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.cfg.optim.clip_grad)
    scaler.step(sync)  # the update: never communicates (Adasum: Horovod combines here)
    scaler.update()
    sync.zero_grad()
    sync.after_step()  # Horovod: local SGD: every dist.local_steps steps, weights averaged
    if parts.ema is not None:
        parts.ema.update(parts.model)
    progress.step += 1


def take_step(parts: Parts, world: World, progress: Progress, epoch: int,
              batches: Iterator[dict[str, Any]], first: int) -> Window:
    """The optimizer step whose micro-batches are the epoch's batches ``first`` onwards."""
    # The step's LR before its first backward (Adasum steps inside backward).
    progress.lr = world.plan.lr(progress.step)
    set_lr(parts.sync, progress.lr)
    window = Window(torch.zeros(4, device=world.ctx.device))
    for b in range(first, first + parts.cfg.optim.accumulate):
        world.watch.progress(f"reading batch {b} of epoch {epoch}", progress.step)
        micro_batch(parts, world, progress, b, next(batches), window)
    update(parts, world, progress, epoch, window)
    return window
