"""Distributed COCO evaluation: every rank detects on its share, rank 0 scores, all receive.

``evaluate_loader`` runs the model over a loader of ``(images, metas)`` (letterboxed float
images in 0..1 and their letterbox metas with ``"image_id"``), turns the detections into COCO
results in original image pixels, then ``score_distributed`` allgathers them, drops the
duplicates that sampler padding creates (an image seen by several ranks, or twice by one, is
scored once: from the first rank that saw it), and rank 0 runs pycocotools; the figures are
broadcast so every rank returns the same dict. Every rank makes the same two collective calls.

With a ``PlotRequest``, each rank also matches its own images' detections with the ground
truth (``matches.match_images``); the matched pairs travel in the same allgather, and rank 0
draws the PR, F1 and confusion figures from them and the image grid from the batches it
evaluated itself (the model never runs twice).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hvd_yolo.config import Config, ConfigError
from hvd_yolo.data.augment import AugmentedDataset, collate
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import EpochIndices, ShardSampler
from hvd_yolo.data.workers import ignore_stop_signals, start_workers
from hvd_yolo.matches import match_images, merge_matches
from hvd_yolo.metrics import coco_evaluate, to_coco_results
from hvd_yolo.model.postprocess import postprocess, to_original
from hvd_yolo.stall import StallWatch

if TYPE_CHECKING:
    from hvd_yolo.comm.horovod import DistContext
    from hvd_yolo.plots import PlotRequest

_ERROR = "__error__"


def class_differences(expected: Sequence[str], found: Sequence[str], limit: int = 5) -> list[str]:
    """Where ``found``'s class list differs from ``expected``'s, index by index (empty: equal)."""
    diffs = []
    for i in range(max(len(expected), len(found))):
        a = repr(expected[i]) if i < len(expected) else "no class"
        b = repr(found[i]) if i < len(found) else "no class"
        if a != b:
            diffs.append(f"class {i} is {a} in training, {b} here")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    return diffs


def check_validation_set(train_dir: str, train_classes: Sequence[str], val_dir: str,
                         val_classes: Sequence[str], images: int) -> None:
    """Raise ConfigError unless the validation set can score this model: the same classes in
    the same order as training's (per-class AP would be reported under the wrong names), and
    at least one image."""
    diffs = class_differences(train_classes, val_classes)
    if diffs:
        raise ConfigError(
            f"data.val={val_dir}: its {len(val_classes)} classes differ from those of "
            f"data.train={train_dir} ({len(train_classes)}): {'; '.join(diffs)}. Convert the "
            f"validation set with the training set's class list (same names, same order)")
    if images == 0:
        raise ConfigError(f"data.val={val_dir}: holds no images")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def detect_batch(
    model: nn.Module,
    images: torch.Tensor,
    metas: Sequence[dict[str, Any]],
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    category_ids: Sequence[int] | None = None,
    *,
    multi_label: bool = False,
) -> list[dict[str, Any]]:
    """Detect on a letterboxed batch; COCO result dicts in each image's original pixels."""
    if len(metas) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(metas)} metas")
    device = next(model.parameters()).device
    images = images.to(device)
    if not images.is_floating_point():
        images = images.float() / 255.0
    with eval_mode(model):
        outputs = model(images)
    dets = postprocess(outputs, model, conf_thres, iou_thres, max_det, multi_label=multi_label)
    results = []
    for det, meta in zip(dets, metas):
        if "image_id" not in meta:
            raise ValueError("each meta needs an 'image_id' (the COCO image id) to export results")
        results += to_coco_results(to_original(det.cpu(), meta), meta["image_id"], category_ids)
    return results


def evaluate_loader(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, Sequence[dict[str, Any]]]],
    gt_coco: dict[str, Any],
    category_ids: Sequence[int] | None = None,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    *,
    multi_label: bool = False,
    progress: bool = False,
    results_path: str | Path | None = None,
    plots: PlotRequest | None = None,
) -> dict[str, Any]:
    """Evaluate this rank's share of the data and score everything (call on every rank).

    Returns the same figures on every rank: ``{"mAP", "mAP50", "AP_small", "AP_medium",
    "AP_large", "per_class_AP", "images", "detections"}`` (see ``metrics.coco_evaluate``).
    ``results_path``: rank 0 also writes the merged detections there as a COCO results json.
    ``plots``: rank 0 also writes the evaluation figures (``figures["plots"]`` lists them;
    ``figures["plots_error"]`` says why they could not be drawn).
    """
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    seen_set: set[int] = set()
    batches = loader
    if progress:
        from hvd_yolo.progress import progress_bar

        batches = progress_bar(loader, desc="eval", unit="batch")
    from hvd_yolo.comm import horovod as dist

    keep_samples = plots is not None and dist.rank() == 0
    for images, metas in batches:
        # An image this rank has already scored (sampler padding) is skipped, not doubled.
        fresh = [i for i, m in enumerate(metas) if int(m["image_id"]) not in seen_set]
        for i in fresh:
            seen_set.add(int(metas[i]["image_id"]))
            seen.append(int(metas[i]["image_id"]))
        if not fresh:
            continue
        if len(fresh) < len(metas):
            images, metas = images[fresh], [metas[i] for i in fresh]
        if keep_samples and len(plots.samples) < plots.images:
            plots.samples += [_sample(images[i], m) for i, m in enumerate(metas)][
                :plots.images - len(plots.samples)]
        results += detect_batch(model, images, metas, conf_thres, iou_thres, max_det,
                                category_ids, multi_label=multi_label)
    return score_distributed(results, gt_coco, seen, max_det=max_det, results_path=results_path,
                             plots=plots)


def _sample(image: torch.Tensor, meta: dict[str, Any]) -> tuple[int, np.ndarray, float]:
    """A letterboxed image cut back to its content (uint8 HWC at input scale), for drawing."""
    left, top = (int(round(v)) for v in meta["pad"])
    scale = float(meta["scale"])
    h, w = (max(1, int(round(v * scale))) for v in meta["orig_hw"])
    img = image[:, top:top + h, left:left + w].detach().float().cpu()
    if img.max() <= 1.0:
        img = img * 255
    return int(meta["image_id"]), img.clamp(0, 255).byte().permute(1, 2, 0).numpy(), scale


def _pack(results: list[dict[str, Any]]) -> np.ndarray:
    """Results as a compact float64 array ``[n, 7]`` (image, category, x, y, w, h, score)."""
    arr = np.zeros((len(results), 7), dtype=np.float64)
    for i, r in enumerate(results):
        arr[i, 0], arr[i, 1] = r["image_id"], r["category_id"]
        arr[i, 2:6] = r["bbox"]
        arr[i, 6] = r["score"]
    return arr


def _unpack(arr: np.ndarray) -> list[dict[str, Any]]:
    return [{"image_id": int(a[0]), "category_id": int(a[1]), "bbox": [float(v) for v in a[2:6]],
             "score": float(a[6])} for a in arr]


def merge_rank_results(
    gathered: Sequence[tuple[Sequence[int], np.ndarray]],
) -> tuple[list[dict[str, Any]], list[int]]:
    """Merge per-rank ``(seen image ids, packed results)`` in rank order, each image once.

    An image's detections come from the first rank that saw it; exact duplicate rows within
    that rank are dropped too. Returns ``(results, unique image ids)``.
    """
    owner: dict[int, int] = {}
    for r, (seen, _) in enumerate(gathered):
        for img in seen:
            owner.setdefault(int(img), r)
    parts = []
    for r, (_, arr) in enumerate(gathered):
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 7)
        if len(arr):
            mine = np.array([owner.get(int(i), -1) == r for i in arr[:, 0]], dtype=bool)
            arr = np.unique(arr[mine], axis=0)
            parts.append(arr)
    merged = np.concatenate(parts) if parts else np.zeros((0, 7))
    merged = merged[np.argsort(-merged[:, 6], kind="stable")] if len(merged) else merged
    return _unpack(merged), sorted(owner)


def score_distributed(
    local_results: list[dict[str, Any]],
    gt_coco: dict[str, Any],
    seen_image_ids: Iterable[int],
    max_det: int = 100,
    results_path: str | Path | None = None,
    plots: PlotRequest | None = None,
) -> dict[str, Any]:
    """Allgather every rank's results, dedupe by image id, score on rank 0, broadcast.

    Call on every rank (two collectives). ``seen_image_ids``: the images this rank evaluated
    (including those with no detection); ``local_results``: their COCO results, at most one
    pass per image (``evaluate_loader`` guarantees it).
    """
    from hvd_yolo.comm import horovod as dist

    seen = [int(i) for i in seen_image_ids]
    tables = None
    if plots is not None:  # this rank's matched pairs, gathered with the detections
        tables = match_images(local_results, gt_coco, set(seen), max_det, plots.conf, plots.iou)
    gathered = dist.allgather_object((seen, _pack(local_results), tables),
                                     name="hvd_yolo.eval.gather")
    figures: dict[str, Any] | None = None
    if dist.rank() == 0:
        try:
            results, image_ids = merge_rank_results([(s, a) for s, a, _ in gathered])
            figures = coco_evaluate(gt_coco, results, image_ids, max_det=max_det)
            if results_path is not None:  # COCO results json: image_id, category_id, bbox, score
                Path(results_path).write_text(json.dumps(results))
        except Exception as exc:  # every rank must reach the broadcast, then all raise
            figures = {_ERROR: f"{type(exc).__name__}: {exc}"}
        if plots is not None and _ERROR not in figures:
            figures.update(_draw(plots, [(s, t) for s, _, t in gathered], gt_coco, results))
    figures = dist.broadcast_object(figures, root_rank=0, name="hvd_yolo.eval.figures")
    if _ERROR in figures:
        raise RuntimeError(f"evaluation failed on rank 0: {figures[_ERROR]}")
    return figures


def _draw(plots: PlotRequest, gathered: list, gt: dict[str, Any],
          results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0: the figures from the merged matched pairs; a failure is reported, not raised
    (the scores stand)."""
    from hvd_yolo.plots import write_eval_plots

    try:
        cats = gt.get("categories", [])
        files = write_eval_plots(plots, merge_matches(gathered), [int(c["id"]) for c in cats],
                                 [str(c["name"]) for c in cats], results, gt)
        return {"plots": [str(f) for f in files]}
    except Exception as exc:
        return {"plots_error": f"{plots.out_dir}: {type(exc).__name__}: {exc}"}


def eval_share(ds: ShardDataset, cfg: Config, ctx: DistContext) -> ShardSampler:
    """This rank's share of the validation set, in order (padded evenly)."""
    return ShardSampler(ds.shard_sizes, ctx.rank, ctx.size, seed=cfg.run.seed, shuffle=False,
                        tail="pad")


def make_eval_loader(ds: ShardDataset, cfg: Config, ctx: DistContext,
                     persistent: bool = False) -> DataLoader:
    """Each rank's share of the validation set (:func:`eval_share`), letterboxed at
    ``input.size``; ``persistent`` keeps its workers from one evaluation to the next (the
    training loop's: ``loader.sampler.sampler`` is re-dealt per world)."""
    return DataLoader(AugmentedDataset(ds, cfg.input.size, train=False),
                      sampler=EpochIndices(eval_share(ds, cfg, ctx)),
                      batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers,
                      collate_fn=collate, worker_init_fn=ignore_stop_signals,
                      persistent_workers=persistent and cfg.data.workers > 0)


def eval_batches(loader: DataLoader, device: torch.device, watch: StallWatch | None = None,
                 step: int = 0) -> Iterator[tuple[torch.Tensor, list]]:
    """The loader's (images in [0, 1], metas), marking progress for the stall watch."""
    for i, b in enumerate(start_workers(loader)):  # stop signals held while workers start
        if watch is not None:
            watch.progress(f"evaluating batch {i}", step)
        yield b["images"].to(device).float().div_(255), b["metas"]
    if watch is not None:
        watch.progress("gathering and scoring the detections", step)


def evaluate(model: nn.Module, loader: DataLoader, ds: ShardDataset, cfg: Config,
             device: torch.device, results_path: str | None = None,
             watch: StallWatch | None = None, step: int = 0,
             plots_dir: PlotRequest | str | Path | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Distributed COCO evaluation (every rank calls it; every rank gets the figures; rank 0
    writes the detections as a COCO results json to ``results_path`` and the evaluation
    figures into ``plots_dir`` (a folder, or a ``PlotRequest``) when given; ``progress``: a
    progress bar on rank 0)."""
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.plots import PlotRequest

    batches: Iterable = eval_batches(loader, device, watch, step)
    if progress and dist.rank() == 0:
        from hvd_yolo.progress import progress_bar

        batches = progress_bar(batches, total=len(loader), desc="eval", unit="batch")
    plots = plots_dir
    if plots_dir is not None and not isinstance(plots_dir, PlotRequest):
        plots = PlotRequest(Path(plots_dir))
    return evaluate_loader(model, batches, ds.coco_ground_truth(), ds.category_ids,
                           cfg.eval.conf_thres, cfg.eval.iou_thres, cfg.eval.max_det,
                           results_path=results_path, plots=plots)
