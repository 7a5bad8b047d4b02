"""The elastic driver: `hvd-yolo train` under ``horovodrun --min-np M --max-np N
--host-discovery-script S``.

The job keeps training when a worker dies (the others roll back to the last commit and go on
with fewer ranks) and grows when the discovery script lists new slots (the new workers receive
the state by broadcast at the next commit).

- The elastic state (``comm.elastic.ElasticState``): weights, optimizer state, EMA weights, and
  where the loop is: the epoch, the step, the sampler's state (``ShardSampler.state_dict``), the
  best mAP. It is committed in memory every ``run.commit_every`` optimizer steps and at each
  epoch's end.
- After every change of the world (:meth:`ElasticDriver.adapt`): a sampler for the new rank and
  world size loads the committed sampler state, which re-deals the epoch's unread samples over
  the new world. Every deal is padded to whole optimizer steps, so no partial step is cut after
  a re-deal: each epoch reads every sample, and the few read twice are counted. The step goes on
  from the committed one; the plan (``loop.plan``) re-fits the LR schedule to end at the run's
  last step on the new world, with the base LR scaled to it.
- Each world gets an id (rank 0's, broadcast); every rank's log line of a step names it, so the
  steps a reset rolled back (those after its world's last commit) can be told from the rest.
  Rank 0 appends one line per commit and per world to ``out_dir/ranks/elastic.jsonl``: the
  step, the committed sampler state, the samples read twice so far in its deal (``padded``),
  the world size and id, the time.

- Each rank's communication state (PowerSGD's error feedback and Q, local SGD's count) is kept
  in memory at every commit; after a reset, every rank continues from it when all of them hold
  that of the same commit (the world kept its size and no worker is new), else every rank
  restarts it, rank 0 warning. Local SGD's ranks hold their own weights between averages: a
  reset gives every rank rank 0's committed ones (the sync), as an average would give them one.

``--resume``: rank 0 loads the checkpoint before the first sync (a restarted launcher
continues from it); the checkpoint's per-rank communication state continues when the first
world has the checkpoint's size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import uuid
from typing import Any

from hvd_yolo.comm import elastic as hvd_elastic
from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm import state as comm_state
from hvd_yolo.config import Config
from hvd_yolo.loop.epoch import run_epoch
from hvd_yolo.loop.plan import make_plan
from hvd_yolo.loop.resume import read_checkpoint
from hvd_yolo.loop.run import Parts, Progress, World, build, make_sampler, open_run, open_watch, open_world
from hvd_yolo.loop.save import end_epoch, finish


class ElasticDriver:
    """The run's parts, its current world and progress, and the elastic state."""

    def __init__(self, parts: Parts, world: World) -> None:
        self.parts, self.world, self.progress = parts, world, Progress()
        self.figures: dict[str, Any] | None = None
        self.log_path = parts.out_dir / "ranks" / "elastic.jsonl"
        # (world id, step, world size) of the last commit, and this rank's communication state
        self.comm_saved: tuple[tuple[str | None, int, int], dict[str, Any]] | None = None
        ema = parts.ema
        extra: dict[str, Any] = {"ema_model": ema.ema} if ema is not None else {}
        self.state = hvd_elastic.ElasticState(
            parts.model, parts.sync, self.on_commit, epoch=0, step=0,
            sampler=world.sampler.state_dict(0), best_map=-1.0, comm_record=None,
            ema_updates=ema.updates if ema is not None else 0, **extra)

    def log(self, record: dict[str, Any]) -> None:
        if self.world.ctx.is_root:
            with self.log_path.open("a") as f:
                f.write(json.dumps({**record, "world": self.world.ctx.size,
                                    "world_id": self.world.world_id, "t": time.time()}) + "\n")

    def on_commit(self) -> None:
        """Every rank, once every rank has reached the commit and it is saved."""
        self.comm_saved = ((self.world.world_id, self.progress.step, self.world.ctx.size),
                           copy.deepcopy(self.parts.sync.comm_state_dict()))
        # the samples read twice so far in this deal (rank 0 alone: it deals every rank's share)
        to = self.state.sampler
        padded = (self.world.sampler.padded(to["offset"])
                  if self.world.ctx.is_root and to["offset"] else 0)
        self.log({"event": "commit", "step": self.progress.step, "epoch": self.state.epoch,
                  "sampler": to, "padded": padded})

    def commit(self, epoch: int, sampler_state: dict[str, Any]) -> None:
        """Commit where the loop is (every rank)."""
        state, progress, ema = self.state, self.progress, self.parts.ema
        state.epoch, state.step, state.best_map = epoch, progress.step, progress.best_map
        state.sampler = sampler_state
        state.ema_updates = ema.updates if ema is not None else 0
        state.commit()

    def restore_comm_state(self, ctx: dist.DistContext) -> None:
        """After a (re)start, every rank: continue the communication state of the commit rolled
        back to when every rank holds that commit's, else restart it everywhere."""
        sync, state = self.parts.sync, self.state
        if not sync.comm_state_dict():
            return
        mine = self.comm_saved[0] if self.comm_saved else None
        if mine is not None and (mine[1], mine[2]) != (state.step, ctx.size):
            mine = None
        # Horovod: every rank's token of the commit whose communication state it holds, and
        # whether it held any (a fresh start holds none)
        gathered = dist.allgather_object((mine, self.comm_saved is not None),
                                         name="hvd_yolo.elastic.comm_state")
        tokens, held = [t for t, _ in gathered], any(h for _, h in gathered)
        if tokens[0] is not None and all(t == tokens[0] for t in tokens):
            sync.load_comm_state_dict(copy.deepcopy(self.comm_saved[1]))
        elif not held and state.comm_record:
            # the first world of a resumed run: the checkpoint's files (same world size only)
            comm_state.load(sync, state.comm_record, self.parts.ckpt_dir, ctx)
        else:
            sync.reset_comm_state()
            if ctx.is_root and held:
                comm_state.restart_warning(sync, f"the world changed ({ctx.size} ranks now)")
        state.comm_record = None  # a checkpoint's files serve the first world only

    def on_step(self, epoch: int, batches_done: int) -> None:
        if (self.progress.step % self.parts.cfg.run.commit_every == 0
                or batches_done == self.world.plan.batches_per_epoch):
            consumed = (batches_done - self.progress.first) * self.parts.cfg.optim.batch_size
            self.commit(epoch, self.world.sampler.state_dict(consumed))

    def resume(self, resume: str) -> None:
        """Rank 0, before the first sync: ``--resume``'s checkpoint into the state (the sync
        then gives it to every rank; a late worker never reads it)."""
        found = read_checkpoint(resume, self.parts, self.world.ctx.size, self.world.sampler)
        if found is None:
            return
        state, ema = self.state, self.parts.ema
        state.epoch, state.step, state.sampler = found.epoch, found.step, found.sampler
        state.best_map, state.comm_record = found.best_map, found.comm_state
        state.ema_updates = ema.updates if ema is not None else 0
        state.save()  # the sync sends the saved state
        print(f"resumed from {found.path}: epoch {found.epoch}", flush=True)

    def adapt(self) -> None:
        """Fit the loop to the current world and the committed state (every rank, after a
        sync)."""
        parts, state, cfg = self.parts, self.state, self.parts.cfg
        ctx = dist.context(self.world.ctx.device)
        sampler = make_sampler(cfg, parts.train_ds, ctx, pad_to_steps=True)
        sampler.load_state_dict(state.sampler)  # another world: the epoch's unread samples re-dealt
        # The step goes on from the commit (never re-derived: it cannot go back).
        plan = make_plan(cfg, sampler.epoch_length(state.epoch + 1), len(sampler), state.epoch,
                         dist.lr_world_scale(cfg.dist.op, ctx.device), step=state.step)
        self.progress = Progress(step=state.step, best_map=state.best_map, epoch=state.epoch,
                                 first=plan.first, done=state.step >= plan.stop_at)
        if parts.ema is not None:
            parts.ema.updates = state.ema_updates
        parts.sync.discard_step()  # a step a dead rank cut short leaves nothing behind
        parts.sync.start_at(state.step)
        self.restore_comm_state(ctx)
        self.world.watch.close()
        world = open_world(parts, ctx, sampler, plan, open_watch(cfg, parts.out_dir, ctx))
        # Horovod: rank 0 names this world; every rank's step lines carry the name.
        world_id = dist.broadcast_object(uuid.uuid4().hex[:12] if ctx.is_root else None,
                                         name="hvd_yolo.elastic.world_id")
        self.world = dataclasses.replace(world, world_id=world_id)

    def epochs(self) -> None:
        """The epochs of this world, from the committed one (reruns after a reset)."""
        self.adapt()
        parts, progress, state = self.parts, self.progress, self.state
        self.log({"event": "start", "step": progress.step, "epoch": state.epoch,
                  "sampler": state.sampler})
        if self.world.ctx.is_root:
            print(f"elastic: {self.world.ctx.size} rank(s) from epoch {state.epoch}, step "
                  f"{progress.step} ({self.world.plan.steps_per_epoch} steps/epoch, lr "
                  f"{self.world.plan.base_lr:g})", flush=True)
        start = state.epoch
        for epoch in range(start, parts.cfg.optim.epochs):
            if progress.done or progress.stopped:
                break
            if epoch != start:
                progress.first = 0
            batches_done = run_epoch(parts, self.world, progress, epoch, self.on_step)
            if progress.stopped:
                break
            self.figures = end_epoch(parts, self.world, progress, epoch, batches_done) or self.figures
            if batches_done >= self.world.plan.batches_per_epoch:  # next epoch: afresh
                self.commit(epoch + 1, {**self.world.sampler.state_dict(0), "epoch": epoch + 1,
                                        "offset": 0, "legs": [], "legs_epoch": epoch + 1})


def train(cfg: Config, resume: str | None = None, timeline: str | None = None) -> dict[str, Any]:
    """Train under an elastic launch; returns the final summary (same on every rank)."""
    # no collective before the elastic loop: a late worker starts while others train
    ctx, lock, hvd_env, watch = open_run(cfg, timeline, elastic=True)
    parts, sampler = build(cfg, ctx, lock, hvd_env,
                           lambda ds: make_sampler(cfg, ds, ctx, pad_to_steps=True))
    plan = make_plan(cfg, sampler.epoch_length(1), len(sampler), 0,
                     dist.lr_world_scale(cfg.dist.op, ctx.device))
    driver = ElasticDriver(parts, open_world(parts, ctx, sampler, plan, watch))
    if resume and ctx.is_root:
        driver.resume(resume)
    hvd_elastic.run(lambda state: driver.epochs())(driver.state)
    return finish(parts, driver.world, driver.progress, driver.figures,
                  {"world": driver.world.ctx.size})
