"""Elastic training: `hvd-yolo train` under `horovodrun --min-np M --max-np N --host-discovery-script S`.

The job keeps training when a worker dies (the others roll back to the last commit and go on
with fewer ranks) and grows when the discovery script lists new slots (the new workers receive
the state by broadcast at the next commit). ``train.train()`` comes here when horovodrun started
the process elastic (``dist.elastic_launch()``).

- :class:`ElasticState` (Horovod's ``TorchState``): weights, optimizer state, EMA weights, and
  where the loop is: the epoch, the step, the sampler's state (``ShardSampler.state_dict``), the
  best mAP. It is committed in memory every ``run.commit_every`` optimizer steps and at each
  epoch's end.
- After every change of the world (:func:`adapt`): a sampler for the new rank and world size
  loads the committed sampler state, which re-deals the epoch's unread samples over the new
  world. Every deal is padded to whole optimizer steps (``pad_to``), so no partial step is cut
  after a re-deal: each epoch reads every sample, and the few read twice are counted. The step
  goes on from the committed one; the LR schedule is re-fitted to end at the run's last step on
  the new world, with the base LR scaled to it.
- Each world gets an id (rank 0's, broadcast); every rank's log line of a step names it, so the
  steps a reset rolled back (those after its world's last commit) can be told from the rest.
  Rank 0 appends one line per commit and per world to ``out_dir/ranks/elastic.jsonl``: the
  step, the committed sampler state, the samples read twice so far in its deal (``padded``),
  the world size and id, the time.

Horovod's elastic state class and its ``run`` decorator live in ``hvd_yolo.comm.elastic``.
``--resume``: rank 0 loads the checkpoint before the first sync (a restarted launcher
continues from it). Not supported in elastic runs (refused at start): ``dist.sync=local`` and
``dist.compression=powersgd`` (their extra state is not part of the commit).
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from hvd_yolo import checkpoint
from hvd_yolo.comm import elastic as hvd_elastic
from hvd_yolo.comm import horovod as dist
from hvd_yolo.config import Config, ConfigError
from hvd_yolo.data.sampler import ShardSampler
from hvd_yolo.evaluate import make_eval_loader
from hvd_yolo.stall import StallWatch
from hvd_yolo.train import Run, end_epoch, finish, make_loaders, setup, train_one_epoch

ElasticState = hvd_elastic.ElasticState


def elastic_state(run: Run, on_commit: Callable[[], None]) -> ElasticState:
    """What every rank rolls back to after a lost worker, and what a new worker receives."""
    extra: dict[str, Any] = {"ema_model": run.ema.ema} if run.ema is not None else {}
    return ElasticState(run.model, run.optimizer, on_commit, epoch=0, step=0,
                        sampler=run.sampler.state_dict(0), best_map=-1.0,
                        ema_updates=run.ema.updates if run.ema is not None else 0, **extra)


def load_checkpoint(run: Run, state: ElasticState, resume: str) -> None:
    """Rank 0, before the first sync: ``--resume``'s checkpoint into the model, optimizer, EMA
    and the state (the sync then gives it to every rank; a late worker never reads it)."""
    found = checkpoint.load_resume(resume, run.cfg.run.out_dir)
    if found is None:
        return
    path, saved = found
    refusals, notes = checkpoint.compare_run(saved, run.cfg.to_dict(), run.ctx.size,
                                             run.train_ds.class_names, run.sampler.num_total,
                                             len(run.sampler.shard_sizes))
    if refusals:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: " + "; ".join(refusals))
    for note in notes:
        warnings.warn(f"resuming from {path}: {note}", stacklevel=1)
    sampler = dict(saved["sampler"])
    if sampler["epoch"] != saved["epoch"]:  # a checkpoint taken at an epoch's end
        sampler.update(epoch=saved["epoch"], offset=0, legs=[])
    run.sampler.load_state_dict(sampler)  # raises if it cannot work
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.ema is not None and saved.get("ema"):
        run.ema.load_state_dict(saved["ema"])
    elif run.ema is not None:
        run.ema.ema.load_state_dict(run.model.state_dict())
        run.ema.updates = 0
    state.epoch, state.step, state.sampler = saved["epoch"], saved["step"], sampler
    state.best_map = max(saved.get("best_map", -1.0), checkpoint.recorded_best(run.ckpt_dir))
    state.ema_updates = run.ema.updates if run.ema is not None else 0
    state.save()  # the sync sends the saved state
    print(f"resumed from {path}: epoch {saved['epoch']}", flush=True)


def check_supported(cfg: Config) -> None:
    if cfg.dist.sync == "local" or cfg.dist.compression == "powersgd":
        raise ConfigError(f"dist.sync={cfg.dist.sync}, dist.compression={cfg.dist.compression}: "
                          "elastic runs support dist.sync=allreduce with compression none/fp16 only")


def elastic_sampler(run: Run, rank: int, size: int) -> ShardSampler:
    """The training sampler of an elastic run: every deal padded to whole optimizer steps (with
    ``data.tail=pad``), so a re-dealt epoch leaves no partial step to cut."""
    cfg = run.cfg
    step_samples = cfg.optim.batch_size * cfg.optim.accumulate if cfg.data.tail == "pad" else 1
    return ShardSampler(run.train_ds.shard_sizes, rank, size, seed=cfg.run.seed, shuffle=True,
                        tail=cfg.data.tail, pad_to=step_samples)


def adapt(run: Run, state: ElasticState) -> None:
    """Fit the loop to the current world and the committed state (every rank, after a sync)."""
    cfg, acc, bs = run.cfg, run.cfg.optim.accumulate, run.cfg.optim.batch_size
    ctx = dist.context(run.ctx.device)
    run.ctx = ctx
    sampler = elastic_sampler(run, ctx.rank, ctx.size)
    sampler.load_state_dict(state.sampler)  # another world: the epoch's unread samples re-dealt
    run.sampler = run.loader.sampler.sampler = sampler
    run.batches_per_epoch = sampler.epoch_length(state.epoch + 1) // bs // acc * acc
    if run.batches_per_epoch == 0:
        raise ValueError(f"{cfg.data.train}: too few images for {ctx.size} ranks of batch_size "
                         f"{bs} x accumulate {acc}")
    run.steps_per_epoch = run.batches_per_epoch // acc
    left = min(run.batches_per_epoch, len(sampler) // bs // acc * acc)  # this epoch, this world
    run.first = run.batches_per_epoch - left
    run.step = state.step  # goes on from the commit (never re-derived: it cannot go back)
    # The LR schedule ends at the run's last step on this world (a world change moves the end).
    run.total_steps = (run.step + left // acc
                       + run.steps_per_epoch * max(0, cfg.optim.epochs - state.epoch - 1))
    run.stop_at = min(run.total_steps, cfg.run.max_steps or run.total_steps)
    run.done = run.step >= run.stop_at
    run.base_lr = cfg.optim.lr * dist.lr_world_scale(cfg.dist.op, ctx.device) * acc
    run.best_map = state.best_map
    if run.ema is not None:
        run.ema.updates = state.ema_updates
    run.optimizer.start_at(run.step)
    run.watch.close()
    run.rank_log = run.out_dir / "ranks" / f"rank{ctx.rank}.jsonl"
    run.watch = StallWatch(run.rank_log.parent, ctx.rank, ctx.size, cfg.dist.stall_warning_s,
                           cfg.dist.stall_shutdown_s)
    if run.val_ds is not None:
        run.eval_loader = make_eval_loader(run.val_ds, cfg, ctx)


def train(cfg: Config, resume: str | None = None, timeline: str | None = None) -> dict[str, Any]:
    """``train.train()`` for an elastic launch; returns the final summary (same on every rank)."""
    check_supported(cfg)
    run = setup(cfg, timeline, elastic=True)  # no collective here: a late worker starts while others train
    make_loaders(run)
    run.sampler = run.loader.sampler.sampler = elastic_sampler(run, run.ctx.rank, run.ctx.size)
    log_path = run.out_dir / "ranks" / "elastic.jsonl"

    def log(record: dict[str, Any]) -> None:
        if run.ctx.is_root:
            with log_path.open("a") as f:
                f.write(json.dumps({**record, "world": run.ctx.size, "world_id": run.world_id,
                                    "t": time.time()}) + "\n")

    def on_commit() -> None:
        # the samples read twice so far in this deal (rank 0 alone: it deals every rank's share)
        to = state.sampler
        padded = run.sampler.padded(to["offset"]) if run.ctx.is_root and to["offset"] else 0
        log({"event": "commit", "step": run.step, "epoch": state.epoch, "sampler": to,
             "padded": padded})

    state = elastic_state(run, on_commit)
    if resume and run.ctx.is_root:
        load_checkpoint(run, state, resume)
    figures: dict[str, Any] | None = None

    def on_step(epoch: int, batches_done: int) -> None:
        if run.step % cfg.run.commit_every == 0 or batches_done == run.batches_per_epoch:
            state.epoch, state.step, state.best_map = epoch, run.step, run.best_map
            state.sampler = run.sampler.state_dict((batches_done - run.first) * cfg.optim.batch_size)
            state.ema_updates = run.ema.updates if run.ema is not None else 0
            state.commit()

    run.on_step = on_step

    @hvd_elastic.run
    def loop(state: ElasticState) -> None:
        nonlocal figures
        adapt(run, state)
        # Horovod: rank 0 names this world; every rank's step lines carry the name.
        run.world_id = dist.broadcast_object(uuid.uuid4().hex[:12] if run.ctx.is_root else None,
                                             name="hvd_yolo.elastic.world_id")
        log({"event": "start", "step": run.step, "epoch": state.epoch, "sampler": state.sampler})
        start_epoch = state.epoch
        if run.ctx.is_root:
            print(f"elastic: {run.ctx.size} rank(s) from epoch {state.epoch}, step {run.step} "
                  f"({run.steps_per_epoch} steps/epoch, lr {run.base_lr:g})", flush=True)
        for epoch in range(state.epoch, cfg.optim.epochs):
            if run.done or run.stopped:
                break
            if epoch != start_epoch:
                run.first = 0
            batches_done = train_one_epoch(run, epoch)
            if run.stopped:
                break
            figures = end_epoch(run, epoch, batches_done) or figures
            if batches_done >= run.batches_per_epoch:  # next epoch: afresh, over that time's world
                state.epoch, state.step, state.best_map = epoch + 1, run.step, run.best_map
                state.sampler = {**run.sampler.state_dict(0), "epoch": epoch + 1, "offset": 0,
                                 "legs": [], "legs_epoch": epoch + 1}
                state.ema_updates = run.ema.updates if run.ema is not None else 0
                state.commit()

    loop(state)
    return finish(run, figures, world=run.ctx.size)
