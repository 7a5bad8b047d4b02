"""The run's arithmetic, pure (no I/O, no collectives): batches and steps per epoch, where the
loop starts in a (resumed) epoch, the LR schedule's length, the stop step and the base LR.
Each formula is here once; both drivers (``fixed``, ``elastic``) use it."""

from __future__ import annotations

from dataclasses import dataclass

from hvd_yolo.config import Config, ConfigError
from hvd_yolo.optim import lr_at


def whole_steps(samples: int, batch_size: int, accumulate: int) -> int:
    """The batches of ``samples`` that make whole optimizer steps (a partial step is cut)."""
    return samples // batch_size // accumulate * accumulate


@dataclass(frozen=True)
class Plan:
    """One world's plan, from a starting ``step`` inside ``epoch``."""

    batches_per_epoch: int  # a whole epoch of this world, whole steps only
    first: int  # the batch of the starting epoch the loop starts at (the resume skip)
    start_step: int  # the optimizer step the loop starts at
    steps_per_epoch: int
    total_steps: int  # the LR schedule's length: it ends at the run's last step
    stop_at: int  # run.max_steps, or the schedule's end
    base_lr: float
    warmup_steps: int
    final_lr_ratio: float

    def lr(self, step: int) -> float:
        """The LR of optimizer step ``step`` (linear warm-up, cosine decay)."""
        return lr_at(step, self.total_steps, self.base_lr, self.warmup_steps, self.final_lr_ratio)


def make_plan(cfg: Config, epoch_samples: int, left_samples: int, epoch: int,
              world_scale: int, step: int | None = None) -> Plan:
    """This rank's plan: ``epoch_samples`` per fresh epoch, ``left_samples`` left of ``epoch``
    (after a resume: the unread ones), ``step`` optimizer steps taken so far; None: re-derived
    from the batches left, as if every epoch had been this world's (another world size or
    batch changes how many steps the epochs before took). Elastic runs pass the committed
    step (it never goes back).

    The LR scales with the global batch (``world_scale``: the world size for averaged
    gradients; Adasum combines updates instead) and with ``optim.accumulate``.
    """
    o, acc = cfg.optim, cfg.optim.accumulate
    batches = whole_steps(epoch_samples, o.batch_size, acc)
    if batches == 0:
        raise ConfigError(
            f"{cfg.data.train}: each rank gets {epoch_samples} samples, fewer than one step of "
            f"optim.batch_size {o.batch_size} x optim.accumulate {acc}: lower them")
    left = min(batches, whole_steps(left_samples, o.batch_size, acc))
    steps_per_epoch = batches // acc
    if step is None:
        step = epoch * steps_per_epoch + (batches - left) // acc
    total = step + left // acc + steps_per_epoch * max(0, o.epochs - epoch - 1)
    return Plan(batches_per_epoch=batches, first=batches - left, start_step=step,
                steps_per_epoch=steps_per_epoch,
                total_steps=total, stop_at=min(total, cfg.run.max_steps or total),
                base_lr=o.lr * world_scale * acc, warmup_steps=o.warmup_steps,
                final_lr_ratio=o.final_lr_ratio)

