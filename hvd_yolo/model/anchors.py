"""Anchors from a dataset: box statistics, best-possible recall, k-means on 1 - IoU, a genetic
refinement (numpy only; ``hvd-yolo anchors`` and the training start's recall check use it).

Box sizes come from the shards' index tables (no image is decoded) and are scaled the way
training letterboxes an image to ``size``: by ``size / max(H, W)``. A box *can be recalled*
when some anchor is within ``THRESHOLD`` times of it in width and height: the loss
(``YoloLoss.anchor_t``) makes exactly those anchor slots positives. Best-possible recall (BPR)
is the fraction of boxes that can be recalled; anchors above threshold (AAT) is the mean number
of anchors within the threshold per box.

``compute_anchors`` clusters ``(w, h)`` with k-means under the distance ``1 - IoU`` (boxes
aligned at a corner, as in YOLOv2), then mutates the result for a few hundred generations,
keeping a mutation when it raises the fitness (the mean, over boxes, of the best anchor's
width/height ratio metric, zero below the threshold). Everything is seeded: the same boxes and
seed give the same anchors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLD = 4.0  # anchor/box width and height ratio the loss matches within (YoloLoss.anchor_t)
MIN_RECALL = 0.98  # training warns below this best-possible recall
MIN_BOX = 2.0  # boxes narrower or lower than this many input pixels are left out
MAX_BOXES = 100_000  # k-means and the refinement use a seeded sample of at most this many
GENERATIONS = 300


def box_sizes(shards: str | Path, size: int, check: bool = True) -> np.ndarray:
    """``[N, 2]`` float64 widths and heights of every box of a shard directory, in input pixels
    of a ``size`` x ``size`` letterbox (index tables only, checked against their sha256 unless
    ``check`` is False; ShardError for a broken directory)."""
    from hvd_yolo.shards.format import check_tables, load_manifest, read_index

    root = Path(shards)
    manifest = load_manifest(root)
    parts = []
    for entry in manifest.get("shards", []):
        idx = read_index(root / entry["file"], check=check)
        check_tables(idx, str(root / entry["file"]), entry)
        scale = size / idx.hw.max(1).astype(np.float64)  # per image
        per_box = np.repeat(scale, np.diff(idx.box_offsets))
        wh = (idx.xyxy[:, 2:4] - idx.xyxy[:, 0:2]).astype(np.float64)
        parts.append(wh * per_box[:, None])
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def usable(wh: np.ndarray) -> np.ndarray:
    """The boxes at least ``MIN_BOX`` pixels wide and high (the others cannot be learned)."""
    return wh[(wh >= MIN_BOX).all(1)]


def _flat(anchors: Sequence[Sequence[Sequence[float]]] | np.ndarray) -> np.ndarray:
    return np.asarray(anchors, dtype=np.float64).reshape(-1, 2)


def ratio_metric(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """``[N, K]``: min over width and height of min(r, 1/r), r = box / anchor (1 = same size)."""
    r = wh[:, None, :] / anchors[None, :, :]
    return np.minimum(r, 1 / r).min(2)


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """``[N, K]`` IoU of boxes and anchors aligned at a corner (sizes only)."""
    inter = np.minimum(wh[:, None, :], anchors[None, :, :]).prod(2)
    return inter / (wh.prod(1)[:, None] + anchors.prod(1)[None, :] - inter)


def recall_stats(wh: np.ndarray, anchors: Sequence[Sequence[Sequence[float]]] | np.ndarray
                 ) -> dict[str, float]:
    """``bpr`` (best-possible recall), ``aat`` (anchors above threshold per box) and
    ``mean_best_iou`` of ``anchors`` (any nesting of ``(w, h)`` pairs) on boxes ``wh``
    (computed in blocks of ``MAX_BOXES``: a COCO-sized set needs little memory)."""
    flat = _flat(anchors)
    if len(wh) == 0:
        return {"bpr": float("nan"), "aat": float("nan"), "mean_best_iou": float("nan")}
    recalled = above = best_iou = 0.0
    for start in range(0, len(wh), MAX_BOXES):
        block = wh[start:start + MAX_BOXES]
        x = ratio_metric(block, flat) > 1 / THRESHOLD
        recalled += float(x.any(1).sum())
        above += float(x.sum())
        best_iou += float(wh_iou(block, flat).max(1).sum())
    n = len(wh)
    return {"bpr": recalled / n, "aat": above / n, "mean_best_iou": best_iou / n}


def fitness(wh: np.ndarray, anchors: np.ndarray) -> float:
    """Mean over boxes of the best anchor's ratio metric, counted only above the threshold."""
    best = ratio_metric(wh, anchors).max(1)
    return float((best * (best > 1 / THRESHOLD)).mean())


def kmeans_iou(wh: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 100
               ) -> np.ndarray:
    """``k`` centres of ``wh`` under the distance ``1 - IoU``: k-means++ seeding, then
    assignment / mean updates until no box changes cluster. An emptied cluster restarts at the
    box farthest from every centre."""
    centres = wh[rng.integers(len(wh))][None].copy()
    for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
        d = (1 - wh_iou(wh, centres).max(1)) ** 2
        p = d / d.sum() if d.sum() > 0 else np.full(len(wh), 1 / len(wh))
        centres = np.vstack([centres, wh[rng.choice(len(wh), p=p)]])
    assign = np.full(len(wh), -1)
    for _ in range(iterations):
        iou = wh_iou(wh, centres)
        new = iou.argmax(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = wh[assign == c]
            if len(members):
                centres[c] = members.mean(0)
            else:
                centres[c] = wh[iou.max(1).argmin()]
    return centres


def evolve(wh: np.ndarray, anchors: np.ndarray, rng: np.random.Generator,
           generations: int = GENERATIONS, prob: float = 0.9, sigma: float = 0.1) -> np.ndarray:
    """Mutate each value by a factor ``1 + N(0, sigma) * u`` (with probability ``prob``, u ~ U(0,
    1), clipped to 0.3..3) and keep the mutant when ``fitness`` rises; ``generations`` tries."""
    best, best_fit = anchors.copy(), fitness(wh, anchors)
    for _ in range(generations):
        factor = np.ones_like(best)
        while np.all(factor == 1):
            mask = rng.random(best.shape) < prob
            factor = (1 + mask * rng.random() * rng.standard_normal(best.shape) * sigma).clip(0.3, 3.0)
        trial = (best * factor).clip(min=MIN_BOX)
        trial_fit = fitness(wh, trial)
        if trial_fit > best_fit:
            best, best_fit = trial, trial_fit
    return best


def by_scale(flat: np.ndarray, num_scales: int) -> list[list[tuple[float, float]]]:
    """Anchors sorted by area, split into ``num_scales`` equal groups, the largest first (the
    model's output order: large stride first), each rounded to whole pixels (at least 1)."""
    order = flat[np.argsort(flat.prod(1), kind="stable")]
    per = len(order) // num_scales
    groups = [order[i * per:(i + 1) * per] for i in range(num_scales)][::-1]
    return [[(float(max(1, round(w))), float(max(1, round(h)))) for w, h in g] for g in groups]


def compute_anchors(wh: np.ndarray, num_scales: int, per_scale: int, seed: int = 0,
                    generations: int = GENERATIONS, restarts: int = 3
                    ) -> list[list[tuple[float, float]]]:
    """Anchors for boxes ``wh`` (``usable`` ones): the best of ``restarts`` k-means runs (mean
    best IoU), refined by ``evolve``; per output, large stride first. ValueError when there are
    fewer boxes than anchors."""
    k = num_scales * per_scale
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes of at least {MIN_BOX:g} px, fewer than the {k} "
                         f"anchors to fit")
    rng = np.random.default_rng(seed)
    sample = wh if len(wh) <= MAX_BOXES else wh[rng.choice(len(wh), MAX_BOXES, replace=False)]
    runs = [kmeans_iou(sample, k, rng) for _ in range(restarts)]
    centres = max(runs, key=lambda c: wh_iou(sample, c).max(1).mean())
    refined = evolve(sample, centres, rng, generations)
    return by_scale(refined, num_scales)


def low_recall_warning(shards: str | Path, anchors: Sequence[Sequence[Sequence[float]]],
                       sizes: Sequence[int], model: str, check: bool = True) -> str | None:
    """The warning for anchors whose best-possible recall on ``shards`` is below
    ``MIN_RECALL`` at one of ``sizes`` (None when it is not), naming the command that fixes it."""
    recall = {}
    for size in sizes:
        wh = usable(box_sizes(shards, size, check))
        if len(wh):
            recall[size] = recall_stats(wh, anchors)["bpr"]
    if not recall or min(recall.values()) >= MIN_RECALL:
        return None
    size = min(recall, key=recall.__getitem__)
    bpr = recall[size]
    return (f"the anchors' best-possible recall on {shards} at input size {size} is {bpr:.4f} "
            f"(below {MIN_RECALL}): {1 - bpr:.1%} of its boxes have no anchor within "
            f"{THRESHOLD:g}x in width and height. `hvd-yolo anchors {shards} --model {model} "
            f"--size {size} --out anchors.yaml` computes anchors for this data (model.anchors)")


def warn_training(cfg: Any, anchors: Sequence[Sequence[Sequence[float]]]) -> str | None:
    """At a training start (rank 0): ``warnings.warn`` the ``low_recall_warning`` of the
    model's ``anchors`` on ``data.train`` at the training size(s); returns it."""
    inp = cfg.input
    sizes = (inp.min_size, inp.max_size) if inp.multiscale else (inp.size,)
    # The training set was opened and checked just before: its index tables are not re-hashed.
    # Only rank 0 runs this: a failure here must not stop it while the others go on.
    try:
        message = low_recall_warning(cfg.data.train, anchors, sizes, cfg.model.name, check=False)
    except (OSError, RuntimeError, ValueError) as e:
        message = f"the anchors' best-possible recall on {cfg.data.train} was not checked: {e}"
    if message:
        warnings.warn(message, stacklevel=2)
    return message


def report(wh_all: np.ndarray, current: Any, new: Any) -> dict[str, Any]:
    """Figures of the current and the new anchors on the usable boxes of ``wh_all``."""
    wh = usable(wh_all)
    return {"boxes": int(len(wh_all)), "boxes_used": int(len(wh)),
            "current": {"anchors": [[list(p) for p in s] for s in current],
                        **recall_stats(wh, current)},
            "new": {"anchors": [[list(p) for p in s] for s in new], **recall_stats(wh, new)}}
