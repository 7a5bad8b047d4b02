"""What a run is made of: the frozen :class:`Parts` (built once, by :func:`build`), the
:class:`World` the ranks stand in (rebuilt after an elastic reset) and the small mutable
:class:`Progress`. Every rank builds them; no collective here except the out_dir decision
(fixed runs)."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hvd_yolo import checkpoint, comm
from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm.syncbn import sync_batchnorm
from hvd_yolo.config import Config
from hvd_yolo.data.augment import AugmentedDataset, collate
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import EpochIndices, ShardSampler
from hvd_yolo.data.workers import fork_workers, ignore_stop_signals
from hvd_yolo.evaluate import check_validation_set, eval_share, make_eval_loader
from hvd_yolo.loop.logs import MetricsLog, StopRequest, rank_log_path
from hvd_yolo.loop.plan import Plan
from hvd_yolo.model import anchors as anchor_check
from hvd_yolo.model.darknet_io import start_from_weights
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.optim import ModelEMA, build_optimizer
from hvd_yolo.runlock import OutDirError, OutDirLock
from hvd_yolo.stall import StallWatch


@dataclass(frozen=True)
class Parts:
    """What the run is built from: the same object for the whole run, on every world."""

    cfg: Config
    out_dir: Path
    lock: OutDirLock | None  # rank 0's hold on out_dir
    hvd_env: dict[str, str]  # the Horovod knobs in force
    train_ds: ShardDataset
    val_ds: ShardDataset | None
    model: torch.nn.Module
    criterion: YoloLoss
    sync: comm.GradSync  # the optimizer and the step's communication
    ema: ModelEMA | None
    scaler: torch.amp.GradScaler
    use_amp: bool
    loader: DataLoader  # its sampler (EpochIndices) reads the World's ShardSampler
    eval_loader: DataLoader | None  # the same, over this world's share of the validation set
    log: MetricsLog
    stop: StopRequest

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def ema_model(self) -> torch.nn.Module | None:
        return self.ema.ema if self.ema is not None else None


@dataclass(frozen=True)
class World:
    """Where the ranks stand: this rank, its sampler and plan, its watch and step log."""

    ctx: dist.DistContext
    sampler: ShardSampler
    plan: Plan
    watch: StallWatch
    rank_log: Path
    world_id: str | None = None  # elastic runs: the id every step line of this world carries


@dataclass
class Progress:
    """What the loop advances."""

    step: int = 0
    best_map: float = -1.0
    epoch: int = 0
    first: int = 0  # the batch this epoch's iteration started at (the sampler counts from it)
    lr: float = 0.0
    stopped: bool = False
    done: bool = False
    t_last: float = field(default_factory=time.perf_counter)
    images_since: int = 0


def kill_workers_at_exit() -> None:
    """Workers an exception left running are killed at exit: they ignore SIGTERM, so
    multiprocessing's exit handler (SIGTERM, then join) would wait for them forever."""
    for child in multiprocessing.active_children():
        child.kill()


def claim_out_dir(out_dir: Path, ctx: dist.DistContext, elastic: bool) -> OutDirLock | None:
    """Rank 0 locks ``out_dir`` for the run and removes temp files of killed checkpoint writes;
    every rank learns the outcome (a busy or unwritable ``out_dir`` raises
    :class:`OutDirError` everywhere)."""
    lock, error = None, None
    if ctx.is_root:
        lock = OutDirLock(out_dir)
        try:
            lock.acquire()
        except OutDirError as exc:
            lock, error = None, str(exc)
    # Horovod: rank 0's decision reaches every rank, so all stop together or none does.
    # (Elastic runs: no collective before the elastic loop, which a late worker joins; a busy
    # out_dir ends rank 0, and so the job.)
    if not elastic:
        error = dist.broadcast_object(error, name="hvd_yolo.train.out_dir_lock")
    if error:
        raise OutDirError(error)
    if lock is not None:
        try:
            removed = checkpoint.clean_temp(out_dir / "checkpoints")
        except OSError as exc:  # not fatal: the run still writes its own checkpoints
            removed = []
            warnings.warn(f"{out_dir / 'checkpoints'}: temp files not removed ({exc})", stacklevel=1)
        if removed:
            print(f"removed {len(removed)} unfinished checkpoint write(s) of a killed run "
                  f"({sum(n for _, n in removed) / 1e6:.1f} MB): "
                  + ", ".join(p.name for p, _ in removed), flush=True)
    return lock


def open_run(cfg: Config, timeline: str | None, elastic: bool
             ) -> tuple[dist.DistContext, OutDirLock | None, dict[str, str], StallWatch]:
    """Horovod's knobs and init, the out_dir claimed and its folders, this rank's stall watch."""
    atexit.unregister(kill_workers_at_exit)  # once, however many runs this process makes
    atexit.register(kill_workers_at_exit)  # runs before multiprocessing's (registered earlier)
    d = cfg.dist
    hvd_env = dist.horovod_settings(d.cycle_time_ms, d.fusion_threshold_mb, d.cuda, timeline,
                                    d.stall_warning_s, d.stall_shutdown_s, elastic)
    ctx = dist.init(threads=d.threads, use_cuda=d.cuda)
    out_dir = Path(cfg.run.out_dir)
    lock = claim_out_dir(out_dir, ctx, elastic)  # one run per out_dir, before anything is written
    if ctx.is_root:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rank_log_path(out_dir, ctx.rank).parent.mkdir(parents=True, exist_ok=True)
    return ctx, lock, hvd_env, open_watch(cfg, out_dir, ctx)


def open_watch(cfg: Config, out_dir: Path, ctx: dist.DistContext) -> StallWatch:
    """A frozen or stuck rank ends the job by name (Horovod's own check cannot see a frozen one)."""
    return StallWatch(rank_log_path(out_dir, ctx.rank).parent, ctx.rank, ctx.size,
                      cfg.dist.stall_warning_s, cfg.dist.stall_shutdown_s)


def load_datasets(cfg: Config) -> tuple[ShardDataset, ShardDataset | None]:
    train_ds = ShardDataset(cfg.data.train, on_corrupt=cfg.data.on_corrupt)
    val_ds = ShardDataset(cfg.data.val, on_corrupt=cfg.data.on_corrupt) if cfg.data.val else None
    if val_ds is not None:  # every rank sees the same files: all refuse together, before any step
        check_validation_set(cfg.data.train, train_ds.class_names, cfg.data.val,
                             val_ds.class_names, len(val_ds))
    return train_ds, val_ds


def build_model_and_sync(cfg: Config, num_classes: int, device: torch.device, is_root: bool
                         ) -> tuple[torch.nn.Module, comm.GradSync, ModelEMA | None]:
    """The model (anchors, Darknet weights, SyncBN), its EMA and the GradSync around its
    optimizer; rank 0 says what the anchors and the weights file did."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (broadcast anyway)
    model = build_model(cfg.model.name, num_classes, anchors=cfg.model.anchors,
                        checkpoint=cfg.model.checkpoint)
    if is_root:  # anchors that cannot reach the data's boxes: warn, naming hvd-yolo anchors
        anchor_check.warn_training(cfg, model.anchors)
    if cfg.model.weights:  # full, backbone-only, or another class count: told by its size
        loaded = start_from_weights(model, cfg.model.weights)
        if is_root:
            print(loaded, flush=True)
    if cfg.dist.sync_bn:
        model = sync_batchnorm(model, cuda=device.type == "cuda")
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema else None
    # The step's communication (hvd_yolo.comm): a checkpoint's optimizer state is loaded into it.
    sync = comm.build(cfg.dist, optimizer, model, cfg.optim.accumulate, cfg.run.seed)
    return model, sync, ema


def make_sampler(cfg: Config, train_ds: ShardDataset, ctx: dist.DistContext,
                 pad_to_steps: bool = False) -> ShardSampler:
    """The training sampler; elastic runs pad every deal to whole optimizer steps (with
    ``data.tail=pad``), so a re-dealt epoch leaves no partial step to cut."""
    step_samples = cfg.optim.batch_size * cfg.optim.accumulate
    pad_to = step_samples if pad_to_steps and cfg.data.tail == "pad" else 1
    return ShardSampler(train_ds.shard_sizes, ctx.rank, ctx.size, seed=cfg.run.seed,
                        shuffle=True, tail=cfg.data.tail, pad_to=pad_to)


def make_train_loader(train_ds: ShardDataset, sampler: ShardSampler, cfg: Config,
                      pin_memory: bool) -> DataLoader:
    """This rank's augmented training batches, in ``sampler``'s order; persistent workers
    (:mod:`hvd_yolo.data.workers`)."""
    canvas = cfg.input.max_size if cfg.input.multiscale else cfg.input.size
    return DataLoader(
        AugmentedDataset(train_ds, canvas, seed=cfg.run.seed, flip=cfg.augment.flip,
                         hsv=cfg.augment.hsv, mosaic=cfg.augment.mosaic),
        sampler=EpochIndices(sampler), batch_size=cfg.optim.batch_size,
        num_workers=cfg.data.workers, collate_fn=collate, worker_init_fn=ignore_stop_signals,
        drop_last=True, pin_memory=pin_memory, persistent_workers=cfg.data.workers > 0)


def build(cfg: Config, ctx: dist.DistContext, lock: OutDirLock | None, hvd_env: dict[str, str],
          sampler_of: Callable[[ShardDataset], ShardSampler]) -> tuple[Parts, ShardSampler]:
    """The datasets, loaders, model, GradSync, log and stop handler; and the first sampler
    (``sampler_of(train_ds)``)."""
    train_ds, val_ds = load_datasets(cfg)
    # Adasum updates each parameter inside its backward hook, before a loss scale could be removed.
    use_amp = ctx.device.type == "cuda" and cfg.dist.op != "adasum"
    sampler = sampler_of(train_ds)
    loader = make_train_loader(train_ds, sampler, cfg, use_amp)
    eval_loader = (make_eval_loader(val_ds, cfg, ctx, persistent=True)
                   if val_ds is not None else None)
    # Both loaders' workers, forked now, before the model is broadcast: a fork while Horovod
    # frees a collective's tensors can hang the worker (hvd_yolo.data.workers). They serve
    # every epoch and evaluation of the run.
    fork_workers(loader, eval_loader)
    model, sync, ema = build_model_and_sync(cfg, len(train_ds.class_names), ctx.device,
                                            ctx.is_root)
    parts = Parts(cfg, Path(cfg.run.out_dir), lock, hvd_env, train_ds, val_ds, model,
                  YoloLoss(model).to(ctx.device), sync, ema,
                  torch.amp.GradScaler("cuda", enabled=use_amp), use_amp, loader, eval_loader,
                  MetricsLog(Path(cfg.run.out_dir), ctx.is_root, cfg.run.tensorboard),
                  StopRequest())
    return parts, sampler


def open_world(parts: Parts, ctx: dist.DistContext, sampler: ShardSampler, plan: Plan,
               watch: StallWatch, world_id: str | None = None) -> World:
    """This world: the loader reads ``sampler``, the evaluation loader this world's share."""
    parts.loader.sampler.sampler = sampler
    if parts.eval_loader is not None:
        parts.eval_loader.sampler.sampler = eval_share(parts.val_ds, parts.cfg, ctx)
    return World(ctx, sampler, plan, watch, rank_log_path(parts.out_dir, ctx.rank), world_id)
