"""COCO-style detection metrics with pycocotools, on COCO json dicts held in memory.

``coco_evaluate(gt, results)`` returns ``{"mAP": AP@[.5:.95], "mAP50": AP@.5, "per_class_AP":
{name: AP@[.5:.95]}, "images": n, "detections": n}`` (all areas, ``max_det`` detections per
image). pycocotools' progress prints are silenced. ``to_coco_results`` exports detections as a
COCO results list (``image_id, category_id, bbox [x, y, w, h], score``), mapping contiguous
class ids back to source category ids.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def to_coco_results(
    detections: torch.Tensor,
    image_id: int,
    category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections ``[k, 6]`` (x1, y1, x2, y2, score, class) in original pixels as
    COCO result dicts; ``category_ids[c]`` is the source id of class ``c`` (identity if None)."""
    det = detections.detach().float().cpu()
    out = []
    for x1, y1, x2, y2, score, cls in det.tolist():
        c = int(cls)
        if category_ids is not None:
            if not 0 <= c < len(category_ids):
                raise ValueError(f"class {c} has no entry in category_ids "
                                 f"({len(category_ids)} given)")
            cat = int(category_ids[c])
        else:
            cat = c
        out.append({"image_id": int(image_id), "category_id": cat,
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(float(score), 6)})
    return out


def coco_ground_truth(
    boxes: Sequence[torch.Tensor | np.ndarray],
    classes: Sequence[torch.Tensor | np.ndarray],
    image_hw: Sequence[tuple[int, int]],
    image_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
    ignore: Sequence[np.ndarray] | None = None,
    file_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A COCO ground-truth dict from per-image ``boxes [k, 4]`` xyxy pixels and ``classes [k]``
    (contiguous class ids, mapped to ``category_ids``). Boxes flagged in ``ignore [k]`` (COCO
    ``iscrowd``, VOC ``difficult``) are exported with ``iscrowd=1``, which pycocotools ignores."""
    n = len(boxes)
    if len(classes) != n or len(image_hw) != n:
        raise ValueError(f"boxes, classes and image_hw differ in length: {n}, {len(classes)}, "
                         f"{len(image_hw)}")
    image_ids = list(range(n)) if image_ids is None else [int(i) for i in image_ids]
    if class_names is None:
        k = 1 + max((int(np.max(np.asarray(c))) for c in classes if len(c)), default=0)
        class_names = [str(i) for i in range(k)]
    category_ids = list(range(len(class_names))) if category_ids is None else list(category_ids)
    images, anns = [], []
    for j, (img_id, bx, cl, (h, w)) in enumerate(zip(image_ids, boxes, classes, image_hw)):
        name = file_names[j] if file_names is not None else f"{img_id}.jpg"
        images.append({"id": img_id, "width": int(w), "height": int(h), "file_name": name})
        flags = np.zeros(len(cl), bool) if ignore is None else np.asarray(ignore[j], bool)
        for (x1, y1, x2, y2), c, crowd in zip(np.asarray(bx, dtype=np.float64).reshape(-1, 4).tolist(),
                                              np.asarray(cl).reshape(-1).tolist(), flags.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": img_id,
                         "category_id": int(category_ids[int(c)]),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": int(crowd)})
    cats = [{"id": int(i), "name": str(nm)} for i, nm in zip(category_ids, class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def _coco(gt: dict[str, Any]):
    from pycocotools.coco import COCO

    data = dict(gt)
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    anns = []
    for a in data.get("annotations", []):
        a = dict(a)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        anns.append(a)
    data["annotations"] = anns
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def coco_evaluate(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    image_ids: Iterable[int] | None = None,
    max_det: int = 100,
) -> dict[str, Any]:
    """COCO bbox mAP of ``results`` against ``gt`` over ``image_ids`` (default: all gt images).

    Returns ``{"mAP", "mAP50", "AP_small", "AP_medium", "AP_large", "per_class_AP": {category
    name: AP}, "images", "detections"}`` (AP_* : AP@[.5:.95] over COCO's area ranges, < 32² px,
    32²..96², > 96²); a figure with no ground truth to score is NaN (classes without any are
    left out).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt)
    ids = sorted(coco_gt.getImgIds() if image_ids is None else {int(i) for i in image_ids})
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"{len(unknown)} image id(s) are not in the ground truth, e.g. "
                         f"{unknown[:5]}: the detections come from another dataset or split")
    id_set = set(ids)
    results = [r for r in results if int(r["image_id"]) in id_set]
    bad = {int(r["image_id"]) for r in results} - set(coco_gt.getImgIds())
    if bad:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(bad)[:5]}")
    names = {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    figures: dict[str, Any] = {"mAP": math.nan, "mAP50": math.nan, "AP_small": math.nan,
                               "AP_medium": math.nan, "AP_large": math.nan, "per_class_AP": {},
                               "images": len(ids), "detections": len(results)}
    if not ids:
        return figures
    # loadRes needs at least one result; with none every AP is 0 where there is ground truth.
    with _quiet():
        coco_dt = coco_gt.loadRes(results) if results else _coco(
            {**coco_gt.dataset, "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.params.maxDets = [1, 10, max(int(max_det), 10)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T iou, R recall, K cls, A area, M maxdets]
    area_all, last_m = 0, -1
    p = precision[:, :, :, area_all, last_m]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        pk = p[:, :, k]
        if (pk > -1).any():
            per_class[names.get(cat_id, cat_id)] = float(np.mean(pk[pk > -1]))
    if per_class:
        # COCO's figure: the mean over all valid (iou, recall, class) cells.
        figures["mAP"] = float(np.mean(p[p > -1]))
        p50 = p[0]
        figures["mAP50"] = float(np.mean(p50[p50 > -1]))
    for a, label in enumerate(ev.params.areaRngLbl[1:], 1):  # small, medium, large
        pa = precision[:, :, :, a, last_m]
        if (pa > -1).any():
            figures[f"AP_{label}"] = float(np.mean(pa[pa > -1]))
    figures["per_class_AP"] = per_class
    return figures


# ------------------------------------------------------------------ matched pairs and curves
# What the evaluation plots are drawn from. Each rank matches its own images' detections with
# the ground truth (``match_images``); rank 0 merges the rows and builds the curves
# (``precision_recall``: COCO's interpolated precision, equal to pycocotools' arrays;
# ``f1_confidence``; ``confusion_matrix``).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's ten thresholds
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points
# A detection's matched-pair row: image, category, score, order in its image, then per IoU
# threshold 1 (true positive), 0 (false positive) or -1 (ignored: matched a crowd box).
MATCH_COLS = 4 + len(IOU_THRESHOLDS)


def _iou_xywh(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' box IoU ``[len(dt), len(gt)]`` (a crowd box: intersection over the
    detection's area)."""
    from pycocotools import mask as mask_utils

    if not len(dt) or not len(gt):
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou(dt.tolist(), gt.tolist(), [int(c) for c in crowd]))


def match_images(
    results: Sequence[dict[str, Any]],
    gt: dict[str, Any],
    image_ids: Iterable[int],
    max_det: int = 100,
    conf: float = 0.25,
    iou: float = 0.45,
) -> dict[str, np.ndarray]:
    """Match ``results`` (COCO result dicts) with ``gt`` on ``image_ids``, image by image.

    Returns three float64 tables, one row each:
    ``"matches"`` per detection (``MATCH_COLS``: image, category, score, order in the image
    (``_dt_order``), then COCO's
    outcome at each IoU threshold: greedy by score, each ground-truth box once, crowd boxes
    ignore what they match, at most ``max(max_det, 10)`` detections per image and category);
    ``"positives"`` per (image, category) with ground truth: ``image, category, boxes`` (not
    crowd); ``"pairs"`` for the confusion matrix at ``iou`` and ``conf``: ``image, true
    category, predicted category`` (-1: background), class-agnostic matches largest IoU first.
    """
    ids = list(dict.fromkeys(int(i) for i in image_ids))  # each image once
    id_set = set(ids)
    max_det = max(int(max_det), 10)
    gt_by_img: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for a in gt.get("annotations", []):
        if int(a["image_id"]) in id_set:
            gt_by_img[int(a["image_id"])].append(a)
    dt_by_img: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for r in results:
        if int(r["image_id"]) in id_set:
            dt_by_img[int(r["image_id"])].append(r)
    matches, positives, pairs = [], [], []
    for img in ids:
        gts, dts = gt_by_img[img], dt_by_img[img]
        for cat in sorted({int(a["category_id"]) for a in gts} | {int(r["category_id"]) for r in dts}):
            g = [a for a in gts if int(a["category_id"]) == cat]
            g.sort(key=lambda a: int(bool(a.get("iscrowd", 0))))  # stable: crowd boxes last
            d = [r for r in dts if int(r["category_id"]) == cat]
            d.sort(key=_dt_order)
            d = d[:max_det]
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in g], dtype=bool)
            if (~crowd).any():
                positives.append((img, cat, float((~crowd).sum())))
            ious = _iou_xywh(np.array([r["bbox"] for r in d]).reshape(-1, 4),
                             np.array([a["bbox"] for a in g]).reshape(-1, 4), crowd)
            outcome = np.zeros((len(d), len(IOU_THRESHOLDS)))
            for t, thr in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(g), bool)
                for i in range(len(d)):
                    best, m = min(thr, 1 - 1e-10), -1
                    for j in range(len(g)):
                        if taken[j] and not crowd[j]:
                            continue
                        if m > -1 and not crowd[m] and crowd[j]:
                            break
                        if ious[i, j] < best:
                            continue
                        best, m = ious[i, j], j
                    if m == -1:
                        continue
                    taken[m] = True
                    outcome[i, t] = -1.0 if crowd[m] else 1.0
            for i, r in enumerate(d):
                matches.append([img, cat, float(r["score"]), float(i), *outcome[i]])
        pairs += _confusion_pairs(img, gts, dts, conf, iou)
    return {"matches": np.array(matches, dtype=np.float64).reshape(-1, MATCH_COLS),
            "positives": np.array(positives, dtype=np.float64).reshape(-1, 3),
            "pairs": np.array(pairs, dtype=np.float64).reshape(-1, 3)}


def _dt_order(r: dict[str, Any]) -> tuple[float, ...]:
    """An image's detections of one category in COCO's order for the results that
    ``evaluate.merge_rank_results`` hands pycocotools: by score, equal scores by box
    (x, y, w, h), so that ties (scores are rounded) match the same boxes as pycocotools does."""
    return (-float(r["score"]), *(float(v) for v in r["bbox"]))


def _confusion_pairs(img: int, gts: list[dict[str, Any]], dts: list[dict[str, Any]],
                     conf: float, iou: float) -> list[tuple[int, int, int]]:
    """One image's (true, predicted) category pairs at ``iou``/``conf``; -1 is background.
    A detection on a crowd box (IoU over its own area >= ``iou``) counts nowhere."""
    dts = [r for r in dts if float(r["score"]) >= conf]
    crowd = [a for a in gts if a.get("iscrowd", 0)]
    gts = [a for a in gts if not a.get("iscrowd", 0)]
    d_box = np.array([r["bbox"] for r in dts], dtype=np.float64).reshape(-1, 4)
    if crowd and len(dts):
        on_crowd = (_iou_xywh(d_box, np.array([a["bbox"] for a in crowd]),
                              np.ones(len(crowd), bool)) >= iou).any(1)
        dts = [r for r, c in zip(dts, on_crowd) if not c]
        d_box = d_box[~on_crowd]
    ious = _iou_xywh(d_box, np.array([a["bbox"] for a in gts], dtype=np.float64).reshape(-1, 4),
                     np.zeros(len(gts), bool))
    di, gi = np.nonzero(ious >= iou)
    order = np.argsort(-ious[di, gi], kind="stable")
    used_d, used_g, out = set(), set(), []
    for k in order:
        i, j = int(di[k]), int(gi[k])
        if i in used_d or j in used_g:
            continue
        used_d.add(i)
        used_g.add(j)
        out.append((img, int(gts[j]["category_id"]), int(dts[i]["category_id"])))
    out += [(img, int(a["category_id"]), -1) for j, a in enumerate(gts) if j not in used_g]
    out += [(img, -1, int(r["category_id"])) for i, r in enumerate(dts) if i not in used_d]
    return out


def merge_matches(gathered: Sequence[tuple[Sequence[int], dict[str, np.ndarray]]]
                  ) -> dict[str, np.ndarray]:
    """Per-rank ``(seen image ids, match_images tables)`` merged in rank order: each image's
    rows from the first rank that saw it (the rule ``evaluate.merge_rank_results`` follows)."""
    owner: dict[int, int] = {}
    for r, (seen, _) in enumerate(gathered):
        for img in seen:
            owner.setdefault(int(img), r)
    out = {}
    for key, cols in (("matches", MATCH_COLS), ("positives", 3), ("pairs", 3)):
        parts = []
        for r, (_, tables) in enumerate(gathered):
            t = np.asarray(tables[key], dtype=np.float64).reshape(-1, cols)
            parts.append(t[[owner.get(int(i), -1) == r for i in t[:, 0]]] if len(t) else t)
        out[key] = np.concatenate(parts) if parts else np.zeros((0, cols))
    return out


def _ranked(tables: dict[str, np.ndarray], cat: int) -> np.ndarray:
    """The category's matched rows in COCO's order: images ascending, each image's
    detections by score, then one stable sort by score over all."""
    m = tables["matches"]
    m = m[m[:, 1] == cat]
    m = m[np.lexsort((m[:, 3], -m[:, 2], m[:, 0]))]
    return m[np.argsort(-m[:, 2], kind="mergesort")]


def precision_recall(tables: dict[str, np.ndarray], category_ids: Sequence[int]
                     ) -> dict[str, np.ndarray]:
    """COCO's interpolated precision from merged matched pairs: ``precision [T, R, K]`` at
    ``IOU_THRESHOLDS`` x ``RECALL_POINTS`` x categories (-1 where a category has no ground
    truth; pycocotools' ``eval["precision"][..., area all, max dets]``), ``recall [T, K]``
    (the largest reached) and ``scores [T, R, K]`` (the confidence at each recall point)."""
    T, R, K = len(IOU_THRESHOLDS), len(RECALL_POINTS), len(category_ids)
    precision, scores = -np.ones((T, R, K)), -np.ones((T, R, K))
    recall = -np.ones((T, K))
    pos = tables["positives"]
    for k, cat in enumerate(category_ids):
        npig = pos[pos[:, 1] == cat, 2].sum()
        if npig == 0:
            continue
        m = _ranked(tables, cat)
        for t in range(T):
            out = m[:, 4 + t]  # ignored rows (-1) stay, counted neither way, as in COCO
            tp = np.cumsum(out == 1).astype(float)
            fp = np.cumsum(out == 0).astype(float)
            sc = m[:, 2]
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, k] = rc[-1] if len(tp) else 0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            inds = np.searchsorted(rc, RECALL_POINTS, side="left")
            valid = inds < len(pr)
            q, s = np.zeros(R), np.zeros(R)
            q[valid], s[valid] = pr[inds[valid]], sc[inds[valid]]
            precision[t, :, k], scores[t, :, k] = q, s
    return {"precision": precision, "recall": recall, "scores": scores}


def f1_confidence(tables: dict[str, np.ndarray], category_ids: Sequence[int],
                  points: int = 1001, iou_index: int = 0) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of each category against the confidence threshold
    (detections with score >= c, COCO matching at ``IOU_THRESHOLDS[iou_index]``):
    ``confidence [P]``, ``precision/recall/f1 [K, P]`` (NaN for a category without ground
    truth; precision 1 where no detection passes)."""
    conf = np.linspace(0.0, 1.0, points)
    K = len(category_ids)
    p, r = np.full((K, points), np.nan), np.full((K, points), np.nan)
    pos = tables["positives"]
    for k, cat in enumerate(category_ids):
        npig = pos[pos[:, 1] == cat, 2].sum()
        if npig == 0:
            continue
        m = _ranked(tables, cat)
        m = m[m[:, 4 + iou_index] >= 0]
        tp = np.concatenate([[0.0], np.cumsum(m[:, 4 + iou_index] == 1)])
        n = np.searchsorted(-m[:, 2], -conf, side="right")  # detections with score >= c
        r[k] = tp[n] / npig
        p[k] = np.where(n > 0, tp[n] / np.maximum(n, 1), 1.0)
    with np.errstate(invalid="ignore"):
        f1 = 2 * p * r / (p + r + 1e-16)
    return {"confidence": conf, "precision": p, "recall": r, "f1": f1}


def confusion_matrix(tables: dict[str, np.ndarray], category_ids: Sequence[int]) -> np.ndarray:
    """Counts ``[K + 1, K + 1]``: rows the true category, columns the predicted one, the last
    row and column background (a missed box: last column; a false detection: last row)."""
    index = {int(c): k for k, c in enumerate(category_ids)}
    K = len(category_ids)
    matrix = np.zeros((K + 1, K + 1), dtype=np.int64)
    for _, t, p in tables["pairs"]:
        matrix[index.get(int(t), K), index.get(int(p), K)] += 1
    return matrix
