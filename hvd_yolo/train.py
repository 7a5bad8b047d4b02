"""The training loop, top to bottom: `hvd-yolo train` under mpirun/horovodrun (or alone).

One optimizer step:
  every rank reads its own batches (ShardSampler: same number of batches on every rank)
  -> resize the batch to this step's input size (same on every rank, no communication)
  -> forward, loss, backward: each gradient's allreduce starts from its backward hook
     (hvd.DistributedOptimizer with named_parameters; fp16-compressed by default)
  -> after ``accumulate`` backward passes: synchronize (wait for the allreduces), clip,
     step, EMA update, all through the step's ``comm.GradSync`` (``dist.compression=powersgd``:
     low-rank gradients, hvd_yolo.comm.powersgd; ``dist.sync=local``: no gradient allreduce,
     the weights averaged every ``dist.local_steps`` steps and before every checkpoint,
     hvd_yolo.comm.local_sgd)
  -> every ``log_every`` steps (0: the last step only): average the step's loss parts (the
     mean over its ``accumulate`` micro-batches) over ranks; rank 0 logs them.
Rank 0 alone prints, logs and writes checkpoints; every rank runs every collective.

One module on purpose (longer than the others): ``train()`` reads top to bottom as
``setup()`` -> ``resume_state()`` -> ``train_one_epoch()`` per epoch -> ``evaluate_epoch()``,
with the loop's state in one ``Run``; the evaluation itself lives in ``evaluate.py``.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hvd_yolo import checkpoint, comm, plots, sigterm
from hvd_yolo.comm import horovod as dist
from hvd_yolo.comm.syncbn import sync_batchnorm
from hvd_yolo.config import Config, ConfigError
from hvd_yolo.data.augment import AugmentedDataset, collate, ignore_stop_signals
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.multiscale import resize_batch, size_for_step
from hvd_yolo.data.sampler import EpochIndices, ShardSampler
from hvd_yolo.evaluate import check_validation_set, evaluate, make_eval_loader
from hvd_yolo.model import anchors as anchor_check
from hvd_yolo.model.darknet_io import start_from_weights
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.optim import ModelEMA, build_optimizer, lr_at, set_lr
from hvd_yolo.progress import progress_bar
from hvd_yolo.runlock import OutDirError, OutDirLock
from hvd_yolo.stall import StallWatch


class StopRequest:
    """SIGTERM/SIGUSR1 (Slurm's time limit or preemption) asks for a checkpoint and a clean
    exit. The flag is combined over ranks every step, so all ranks stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


@atexit.register  # runs before multiprocessing's own exit handler (registered earlier)
def kill_workers_at_exit() -> None:
    """Workers an exception left running are killed at exit: they ignore SIGTERM, so
    multiprocessing's exit handler (SIGTERM, then join) would wait for them forever."""
    for child in multiprocessing.active_children():
        child.kill()


def train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode (running
    statistics used and kept, so a step does not depend on how its batch is split)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def horovod_environment(cfg: Config, timeline: str | None, elastic: bool = False) -> dict[str, str]:
    """Horovod reads these at ``hvd.init()``: set them before it runs."""
    return dist.horovod_settings(cfg.dist.cycle_time_ms, cfg.dist.fusion_threshold_mb, cfg.dist.cuda,
                                 timeline, cfg.dist.stall_warning_s, cfg.dist.stall_shutdown_s,
                                 elastic)


class NonFiniteLoss(FloatingPointError):
    """A rank's loss was NaN/inf; raised on every rank at the same step (a collective decision)."""


def nonfinite_message(bad: dict[int, int], step: int, epoch: int) -> str:
    where = ", ".join(f"rank {r} batch {b}" for r, b in sorted(bad.items()))
    return (f"the loss is not finite (NaN/inf) at step {step} (epoch {epoch}; {where} of the "
            f"rank's epoch); every rank stopped before this step's update. Lower optim.lr, or "
            f"check those batches' data; resume from the last checkpoint with --resume auto")


class MetricsLog:
    """Rank 0's JSON-lines log (``metrics.jsonl``) and optional TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard=true needs the tensorboard package "
                                   "(.venv/bin/pip install tensorboard)") from exc
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])


def claim_out_dir(out_dir: Path, ctx: dist.DistContext) -> OutDirLock | None:
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
    if not dist.elastic_launch():
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


@dataclass
class Start:
    """Where the loop starts: ``skip_batches`` of ``epoch`` done, optimizer step ``step``."""

    epoch: int = 0
    step: int = 0
    skip_batches: int = 0
    best_map: float = -1.0
    path: str | None = None


def resume_state(resume: str | None, cfg: Config, ctx: dist.DistContext, model: torch.nn.Module,
                 optimizer: comm.GradSync, ema: ModelEMA | None,
                 scaler: torch.amp.GradScaler, sampler: ShardSampler, class_names: list[str],
                 batches_per_epoch: int) -> Start:
    """Make every rank hold the same starting state: rank 0's fresh weights, or a checkpoint.

    Rank 0 alone finds, verifies and reads the checkpoint (``--resume auto`` falls back past
    corrupted files) and checks it against this run; its decision, the small state and the
    weights, optimizer state and EMA reach the other ranks by broadcasts, so ranks need not see
    the file. Refused: another seed, tail mode, dataset, model or classes. Another world size,
    batch size or accumulation re-deals the epoch's unread samples over this run (the
    sampler), and the step, so the schedule, is re-derived from the batches left.
    """
    meta: dict[str, Any] = {"path": None}
    found = None
    if ctx.is_root and resume:
        try:
            found = checkpoint.load_resume(resume, cfg.run.out_dir)
            if found is not None:
                path, state = found
                refusals, notes = checkpoint.compare_run(
                    state, cfg.to_dict(), ctx.size, class_names, sampler.num_total,
                    len(sampler.shard_sizes))
                if refusals:
                    raise checkpoint.CheckpointError(
                        f"cannot resume from {path}: " + "; ".join(refusals) + ". Resume with "
                        "the checkpoint's values, or start a new run (another run.out_dir, "
                        "no --resume)")
                for note in notes:
                    warnings.warn(f"resuming from {path}: {note}", stacklevel=1)
                saved = dict(state["sampler"])
                if saved["epoch"] != state["epoch"]:  # a checkpoint taken at an epoch's end
                    saved.update(epoch=state["epoch"], offset=0, legs=[])
                sampler.load_state_dict(saved)  # raises here, on rank 0, if it cannot work
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if ema is not None and state.get("ema"):
                    ema.load_state_dict(state["ema"])
                elif ema is not None:  # a checkpoint of a run without EMA: start it here
                    ema.ema.load_state_dict(model.state_dict())
                    ema.updates = 0
                meta = {"path": str(path), "epoch": state["epoch"], "sampler": saved,
                        # the checkpoint predates its own evaluation: best.json has that mAP
                        "best_map": max(state.get("best_map", -1.0), checkpoint.recorded_best(
                            Path(cfg.run.out_dir) / "checkpoints")),
                        "ema": (ema.updates, ema.decay) if ema is not None else None,
                        "scaler": state.get("scaler")}
        except checkpoint.CheckpointError as exc:
            meta = {"path": None, "error": str(exc)}
        except Exception as exc:  # any failure on rank 0 must end every rank, not hang them
            meta = {"path": None, "error": f"cannot resume from {found[0] if found else resume}: "
                                           f"{exc}"}
    # Horovod: rank 0's decision and the checkpoint's small state reach every rank.
    meta = dist.broadcast_object(meta, name="hvd_yolo.train.resume")
    if meta.get("error"):
        raise checkpoint.CheckpointError(meta["error"])
    # Horovod: rank 0's weights everywhere. A fresh optimizer is identical on every rank by
    # construction (Horovod's broadcast_optimizer_state would take a zero-gradient step to
    # create state, applying weight decay), so optimizer state is broadcast only on a resume.
    dist.broadcast_state(model, optimizer.optimizer if meta["path"] else None)
    if meta["path"] is None:
        return Start()
    if ema is not None:
        dist.broadcast_state(ema.ema)  # Horovod: the EMA weights and buffers
        ema.updates, ema.decay = meta["ema"]
    if meta["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    if not ctx.is_root:
        sampler.load_state_dict(meta["sampler"])
    # The batches left of the resumed epoch (the same on every rank), whole steps only.
    acc, bs = cfg.optim.accumulate, cfg.optim.batch_size
    left = min(batches_per_epoch, len(sampler) // bs // acc * acc)
    skip = batches_per_epoch - left
    step = meta["epoch"] * (batches_per_epoch // acc) + skip // acc
    if ctx.is_root:
        print(f"resumed from {meta['path']}: epoch {meta['epoch']}, step {step} "
              f"({sampler.fraction_done():.1%} of the epoch read)", flush=True)
    return Start(meta["epoch"], step, skip, meta["best_map"], meta["path"])

@dataclass
class Run:
    """Everything the loop works with: built by :func:`setup`, advanced by :func:`train_one_epoch`."""

    cfg: Config
    ctx: dist.DistContext
    out_dir: Path
    ckpt_dir: Path
    lock: OutDirLock | None
    watch: StallWatch
    rank_log: Path
    hvd_env: dict[str, str]
    train_ds: ShardDataset
    val_ds: ShardDataset | None
    model: torch.nn.Module
    criterion: YoloLoss
    optimizer: comm.GradSync
    ema: ModelEMA | None
    scaler: torch.amp.GradScaler
    use_amp: bool
    adasum: bool
    canvas: int
    sampler: ShardSampler
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    stop_at: int
    base_lr: float
    loader: DataLoader | None = None
    eval_loader: DataLoader | None = None
    log: MetricsLog | None = None
    stop: StopRequest | None = None
    # loop state
    step: int = 0
    lr: float = 0.0
    best_map: float = -1.0
    first: int = 0  # the batch this epoch's iteration started at (the sampler counts from it)
    stopped: bool = False
    done: bool = False
    t_last: float = 0.0
    images_since: int = 0
    # elastic runs (hvd_yolo.elastic): called with (epoch, batches done) after every step, and
    # the id of the world the steps are taken in (a reset starts another), in the rank log
    on_step: Any = None
    world_id: str | None = None


def setup(cfg: Config, timeline: str | None, elastic: bool = False) -> Run:
    """Horovod, the out_dir, the datasets, the model and optimizer, the sampler (every rank)."""
    hvd_env = horovod_environment(cfg, timeline, elastic)
    ctx = dist.init(threads=cfg.dist.threads, use_cuda=cfg.dist.cuda)
    device, world, acc, bs = ctx.device, ctx.size, cfg.optim.accumulate, cfg.optim.batch_size
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    lock = claim_out_dir(out_dir, ctx)  # one run per out_dir, before anything is written there
    if ctx.is_root:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rank_log = out_dir / "ranks" / f"rank{ctx.rank}.jsonl"
    rank_log.parent.mkdir(parents=True, exist_ok=True)
    # A frozen or stuck rank ends the job by name (Horovod's own check cannot see a frozen one).
    watch = StallWatch(rank_log.parent, ctx.rank, world, cfg.dist.stall_warning_s,
                       cfg.dist.stall_shutdown_s)

    train_ds = ShardDataset(cfg.data.train, on_corrupt=cfg.data.on_corrupt)
    val_ds = ShardDataset(cfg.data.val, on_corrupt=cfg.data.on_corrupt) if cfg.data.val else None
    if val_ds is not None:  # every rank sees the same files: all refuse together, before any step
        check_validation_set(cfg.data.train, train_ds.class_names, cfg.data.val,
                             val_ds.class_names, len(val_ds))
    num_classes = len(train_ds.class_names)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (broadcast anyway)
    model = build_model(cfg.model.name, num_classes, anchors=cfg.model.anchors,
                        checkpoint=cfg.model.checkpoint)
    if ctx.is_root:  # anchors that cannot reach the data's boxes: warn, naming hvd-yolo anchors
        anchor_check.warn_training(cfg, model.anchors)
    if cfg.model.weights:  # full, backbone-only, or another class count: told by its size
        loaded = start_from_weights(model, cfg.model.weights)
        if ctx.is_root:
            print(loaded, flush=True)
    if cfg.dist.sync_bn:
        model = sync_batchnorm(model, cuda=device.type == "cuda")
    model.to(device)
    criterion = YoloLoss(model).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema else None
    # Adasum updates each parameter inside its backward hook, before a loss scale could be removed.
    adasum = cfg.dist.op == "adasum"
    use_amp = device.type == "cuda" and not adasum
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    canvas = cfg.input.max_size if cfg.input.multiscale else cfg.input.size
    sampler = ShardSampler(train_ds.shard_sizes, ctx.rank, world, seed=cfg.run.seed,
                           shuffle=True, tail=cfg.data.tail)
    batches_per_epoch = (len(sampler) // bs) // acc * acc  # whole optimizer steps only
    if batches_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.train}: {len(train_ds)} images give each of {world} ranks {len(sampler)} "
            f"samples, fewer than one step of batch_size {bs} x accumulate {acc}: lower them")
    steps_per_epoch = batches_per_epoch // acc
    total_steps = steps_per_epoch * cfg.optim.epochs  # the LR schedule's length
    stop_at = min(total_steps, cfg.run.max_steps or total_steps)  # max_steps: stop early
    # LR scales with the global batch (averaged gradients); Adasum combines updates instead.
    base_lr = cfg.optim.lr * dist.lr_world_scale(cfg.dist.op, device) * acc
    # The step's communication (hvd_yolo.comm): a checkpoint's optimizer state is loaded into it.
    optimizer = comm.build(cfg.dist, optimizer, model, acc, cfg.run.seed)
    return Run(cfg, ctx, out_dir, ckpt_dir, lock, watch, rank_log, hvd_env, train_ds, val_ds,
               model, criterion, optimizer, ema, scaler, use_amp, adasum, canvas, sampler,
               batches_per_epoch, steps_per_epoch, total_steps, stop_at, base_lr)


def make_loaders(run: Run) -> None:
    """The training loader (after the resume: it reads the sampler's resumed position), the
    evaluation loader, the metrics log and the stop-signal handler."""
    cfg = run.cfg
    run.loader = DataLoader(
        AugmentedDataset(run.train_ds, run.canvas, seed=cfg.run.seed, flip=cfg.augment.flip,
                         hsv=cfg.augment.hsv, mosaic=cfg.augment.mosaic),
        sampler=EpochIndices(run.sampler), batch_size=cfg.optim.batch_size,
        num_workers=cfg.data.workers, collate_fn=collate, worker_init_fn=ignore_stop_signals,
        drop_last=True, pin_memory=run.use_amp, persistent_workers=False)
    run.eval_loader = make_eval_loader(run.val_ds, cfg, run.ctx) if run.val_ds is not None else None
    run.log = MetricsLog(run.out_dir, run.ctx.is_root, cfg.run.tensorboard)
    run.stop = StopRequest()


def save_checkpoint(run: Run, epoch: int, batches_done: int) -> Path | None:
    """Rank 0 writes a checkpoint after ``batches_done`` batches of ``epoch`` (every rank
    calls it: the BatchNorm statistics are averaged first); returns its path on rank 0."""
    run.watch.progress("averaging BatchNorm statistics, writing a checkpoint", run.step)
    # Horovod: BatchNorm running statistics (model and EMA) averaged over ranks; local SGD:
    # weights, buffers, optimizer state and EMA (every rank holds the model it saves).
    run.optimizer.before_save(run.model, run.ema.ema if run.ema else None)
    if not run.ctx.is_root:
        return None
    if batches_done:  # the sampler counts from where this epoch's iteration started
        sampler_state = run.sampler.state_dict((batches_done - run.first) * run.cfg.optim.batch_size)
    else:
        sampler_state = {**run.sampler.state_dict(0), "epoch": epoch, "offset": 0}
    state = {
        "model": run.model.state_dict(), "ema": run.ema.state_dict() if run.ema else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.use_amp else None,
        "epoch": epoch, "step": run.step, "best_map": run.best_map,
        "sampler": sampler_state, "config": run.cfg.to_dict(),
        "world_size": run.ctx.size, "class_names": run.train_ds.class_names,
        "category_ids": run.train_ds.category_ids, "model_name": run.cfg.model.name,
    }
    return checkpoint.save(state, run.ckpt_dir, run.step, run.cfg.run.keep_last)


def evaluate_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Save, then evaluate the saved model on every rank; rank 0 logs and records best.pt."""
    # Saved before evaluating (a failing evaluation loses no epoch), with the BN statistics
    # averaged over ranks, so every rank evaluates the model the checkpoint holds.
    path = save_checkpoint(run, epoch + 1, 0)
    last = epoch + 1 == run.cfg.optim.epochs or run.done  # the last evaluation draws its figures
    figures = evaluate(run.ema.ema if run.ema else run.model, run.eval_loader, run.val_ds, run.cfg,
                       run.ctx.device, watch=run.watch, step=run.step,
                       plots_dir=run.out_dir / "plots" if last else None)
    is_best = figures["mAP"] > run.best_map
    run.best_map = max(run.best_map, figures["mAP"])
    run.log.write({"type": "eval", "step": run.step, "epoch": epoch,
                   **{k: figures.get(k) for k in ("mAP", "mAP50", "AP_small", "AP_medium",
                                                  "AP_large", "per_class_AP")}})
    if run.ctx.is_root:
        print(f"epoch {epoch}: mAP@0.5:0.95 {figures['mAP']:.4f}  mAP@0.5 {figures['mAP50']:.4f}",
              flush=True)
        plots.training_figures(run.out_dir, figures)  # results.png from metrics.jsonl
    if is_best and path is not None:
        checkpoint.record_best(run.ckpt_dir, path, figures, run.step)
    return figures


def log_step(run: Run, values: torch.Tensor, epoch: int, size: int, bar: Any) -> None:
    """Rank 0 logs the step's loss parts averaged over ranks (every rank calls it)."""
    # Horovod: the step's (loss, box, obj, cls) averaged over ranks.
    avg = dist.allreduce_mean(values, name="hvd_yolo.train.metrics").tolist()
    now = time.perf_counter()
    img_s = run.images_since * run.ctx.size / max(now - run.t_last, 1e-9)
    run.t_last, run.images_since = now, 0
    sent = run.optimizer.bytes_sent  # PowerSGD, local SGD: rank 0's allreduce payload
    run.log.write({"type": "step", "step": run.step, "epoch": epoch, "lr": run.lr, "size": size,
                   "loss": avg[0], "box": avg[1], "obj": avg[2], "cls": avg[3], "img_s": img_s,
                   **({"bytes_sent": sent} if sent is not None else {})})
    if bar is not None:
        bar.set_postfix(loss=f"{avg[0]:.3f}", box=f"{avg[1]:.3f}", obj=f"{avg[2]:.3f}",
                        cls=f"{avg[3]:.3f}", lr=f"{run.lr:.2e}", img_s=f"{img_s:.1f}", size=size)


def train_one_epoch(run: Run, epoch: int) -> int:
    """Train ``epoch`` from batch ``run.first`` until its end, ``run.stop_at`` or a stop
    request; returns the number of the epoch's batches done."""
    cfg, model, optimizer, scaler, device = run.cfg, run.model, run.optimizer, run.scaler, run.ctx.device
    acc = cfg.optim.accumulate
    run.loader.sampler.set_epoch(epoch)  # keeps a resumed offset for the resumed epoch
    bar = None
    if run.ctx.is_root and cfg.run.progress:  # tqdm on a terminal, else a line per interval
        bar = progress_bar(total=run.batches_per_epoch, initial=run.first, desc=f"epoch {epoch}",
                           unit="batch")
    train_mode(model, cfg.model.freeze_bn)
    batches = iter(run.loader)
    window = torch.zeros(4, device=device)  # this step's (loss, box, obj, cls) summed over micro-batches
    samples: list[int] = []  # this step's sample indices on this rank (the rank log lists them)
    bad_batch: int | None = None
    corrupt = 0  # samples of this rank's batches that failed their CRC32/decode and were replaced
    b = run.first - 1  # a checkpoint taken at the epoch's last batch resumes into an empty range
    for b in range(run.first, run.batches_per_epoch):
        if b % acc == 0:  # a step's first micro-batch (Adasum steps inside backward: LR first)
            run.lr = lr_at(run.step, run.total_steps, run.base_lr, cfg.optim.warmup_steps,
                           cfg.optim.final_lr_ratio)
            set_lr(optimizer, run.lr)
            bad_batch = None  # this rank's first batch of the step with a non-finite loss
        run.watch.progress(f"reading batch {b} of epoch {epoch}", run.step)
        batch = next(batches)
        corrupt += sum(m.get("corrupt", 0) for m in batch["metas"])
        samples += [m["index"] for m in batch["metas"]]
        size = (size_for_step(run.step, cfg.run.seed, cfg.input.every, cfg.input.min_size,
                              cfg.input.max_size) if cfg.input.multiscale else cfg.input.size)
        images = batch["images"].to(device, non_blocking=True).float().div_(255)
        images, targets = resize_batch(images, batch["targets"].to(device), size)
        with torch.autocast(device.type, enabled=run.use_amp):
            outputs = model(images)
        loss, parts = run.criterion([o.float() for o in outputs], targets)
        if bad_batch is None and not torch.isfinite(loss):
            bad_batch = b  # decided with the other ranks at the step (they must not hang)
        # Horovod: each gradient's allreduce starts in its backward hook.
        scaler.scale(loss / acc).backward()
        window += torch.stack([loss.detach(), parts["box"], parts["obj"], parts["cls"]])
        run.images_since += images.shape[0]
        if (b + 1) % acc:
            continue
        # ------------------------------------------------ optimizer step
        run.watch.progress(f"waiting for the other ranks' gradients of step {run.step + 1}", run.step)
        optimizer.synchronize()  # Horovod: this step's communication (Adasum: in step())
        # Horovod: one small allreduce decides for every rank: a stop request, a bad loss.
        run.stopped, bad = dist.nonfinite_ranks(run.stop.requested, bad_batch,
                                                "hvd_yolo.train.decide")
        if bad:
            raise NonFiniteLoss(nonfinite_message(bad, run.step + 1, epoch))
        scaler.unscale_(optimizer)  # (Adasum: AMP off, and config refuses optim.clip_grad)
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        scaler.step(optimizer)  # the update: never communicates (Adasum: Horovod combines here)
        scaler.update()
        optimizer.zero_grad()
        optimizer.after_step()  # Horovod: local SGD: every dist.local_steps steps, weights averaged
        if run.ema is not None:
            run.ema.update(model)
        run.step += 1
        # The step's loss is its window's mean (the loss its gradient belongs to).
        values, window = (window / acc).cpu(), torch.zeros_like(window)
        record = {"step": run.step, "epoch": epoch, "size": size, "loss": values[0].item(),
                  "samples": samples}
        with run.rank_log.open("a") as f:
            f.write(json.dumps(record | ({"world_id": run.world_id} if run.world_id else {})) + "\n")
        samples = []
        if (cfg.run.log_every and run.step % cfg.run.log_every == 0) or run.step == run.stop_at:
            log_step(run, values, epoch, size, bar)
        if bar is not None:
            bar.update(acc)
        run.done = run.step >= run.stop_at
        if run.stopped or (cfg.run.checkpoint_every and run.step % cfg.run.checkpoint_every == 0):
            save_checkpoint(run, epoch, b + 1)
        if run.on_step is not None:
            run.on_step(epoch, b + 1)  # elastic runs: commit the state (hvd_yolo.elastic)
        if run.stopped or run.done:
            break
    if bar is not None:
        bar.close()
    run.watch.progress(f"waiting for the other ranks at the end of epoch {epoch}", run.step)
    dist.join()  # Horovod: guard: every rank has finished the epoch's collectives
    # Horovod: the epoch's replaced corrupt samples, summed over ranks (each was named on stderr)
    corrupt = int(dist.allreduce_sum(float(corrupt), "hvd_yolo.train.corrupt").item())
    if corrupt:
        run.log.write({"type": "data", "step": run.step, "epoch": epoch, "corrupt_skipped": corrupt})
        if run.ctx.is_root:
            print(f"epoch {epoch}: {corrupt} corrupt sample(s) skipped and replaced "
                  f"(data.on_corrupt=skip; named above); check the data with "
                  f"`hvd-yolo shards verify {cfg.data.train}`", flush=True)
    return b + 1


def train(cfg: Config, resume: str | None = None, timeline: str | None = None) -> dict[str, Any]:
    """Train as configured; returns the final summary (same on every rank)."""
    # ---------------------------------------------------------------- set-up
    run = setup(cfg, timeline)
    ctx = run.ctx

    # ---------------------------------------------------------------- resume
    start = resume_state(resume, cfg, ctx, run.model, run.optimizer, run.ema, run.scaler,
                         run.sampler, run.train_ds.class_names, run.batches_per_epoch)
    run.step, run.best_map = start.step, start.best_map
    run.optimizer.start_at(run.step)  # PowerSGD's start step, local SGD's warm-up
    make_loaders(run)
    sigterm.announce_stops(run.out_dir, run.rank_log, ctx.rank)  # what a stop signal saves
    if ctx.is_root:
        print(f"training {cfg.model.name} ({len(run.train_ds.class_names)} classes) on {ctx.size} "
              f"rank(s), {len(run.train_ds)} images, {run.steps_per_epoch} steps/epoch x "
              f"{cfg.optim.epochs} epochs, global batch "
              f"{cfg.optim.batch_size * ctx.size * cfg.optim.accumulate}, lr {run.base_lr:g}, "
              f"op {cfg.dist.op}, compression {cfg.dist.compression}, sync {cfg.dist.sync}"
              + (f" every {cfg.dist.local_steps} steps" if cfg.dist.sync == "local" else "") + "; "
              + (" ".join(f"{k}={v}" for k, v in run.hvd_env.items()) or "Horovod defaults"),
              flush=True)

    # ---------------------------------------------------------------- the loop
    run.lr = lr_at(run.step, run.total_steps, run.base_lr, cfg.optim.warmup_steps,
                   cfg.optim.final_lr_ratio)
    run.done, run.t_last = run.step >= run.stop_at, time.perf_counter()
    figures = None
    for epoch in range(start.epoch, cfg.optim.epochs):
        if run.done or run.stopped:
            break
        run.first = start.skip_batches if epoch == start.epoch else 0
        batches_done = train_one_epoch(run, epoch)
        if run.stopped:
            if ctx.is_root:
                print(f"stop requested ({run.stop.signal_name or 'another rank'}): checkpoint "
                      f"written at step {run.step}; resume with --resume auto", flush=True)
            break
        figures = end_epoch(run, epoch, batches_done) or figures

    # ---------------------------------------------------------------- summary
    return finish(run, figures)


def end_epoch(run: Run, epoch: int, batches_done: int) -> dict[str, Any] | None:
    """After an epoch's loop (whole, or cut by run.max_steps): evaluate when due (which saves
    first), else save; returns the evaluation's figures, or None."""
    cfg = run.cfg
    epoch_done = batches_done >= run.batches_per_epoch
    last_epoch = epoch + 1 == cfg.optim.epochs or run.done
    if run.eval_loader is not None and epoch_done and (
            (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0) or last_epoch):
        return evaluate_epoch(run, epoch)
    save_checkpoint(run, epoch + 1 if epoch_done else epoch, 0 if epoch_done else batches_done)
    return None


def finish(run: Run, figures: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """The run's summary (logged, returned), the stall watch stopped, the out_dir released."""
    summary = {"steps": run.step, "stopped": run.stopped, **extra,
               "mAP": figures["mAP"] if figures else None,
               "mAP50": figures["mAP50"] if figures else None, "best_mAP": run.best_map,
               "out_dir": str(run.out_dir), "checkpoint": str(run.ckpt_dir / "last.pt")}
    run.log.write({"type": "summary", "step": run.step, **summary})
    run.watch.close()
    if run.lock is not None:
        run.lock.release()
    return summary
