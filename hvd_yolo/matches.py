"""Matched pairs and the curves built from them: what the evaluation figures are drawn from.

Each rank matches its own images' detections with the ground truth (``match_images``: COCO's
matching, pycocotools' IoU); the tables are gathered and merged by image owner
(``merge_matches``), and rank 0 builds ``precision_recall`` (COCO's interpolated precision,
equal to pycocotools' arrays), ``f1_confidence`` and ``confusion_matrix``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

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


def _with_ground_truth(tables: dict[str, np.ndarray], category_ids: Sequence[int]
                       ) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(k, ground-truth boxes, ranked rows)`` of each category that has ground truth (the
    others are left at their "none" value by the callers)."""
    pos = tables["positives"]
    for k, cat in enumerate(category_ids):
        npig = pos[pos[:, 1] == cat, 2].sum()
        if npig > 0:
            yield k, float(npig), _ranked(tables, cat)


def precision_recall(tables: dict[str, np.ndarray], category_ids: Sequence[int]
                     ) -> dict[str, np.ndarray]:
    """COCO's interpolated precision from merged matched pairs: ``precision [T, R, K]`` at
    ``IOU_THRESHOLDS`` x ``RECALL_POINTS`` x categories (-1 where a category has no ground
    truth; pycocotools' ``eval["precision"][..., area all, max dets]``), ``recall [T, K]``
    (the largest reached) and ``scores [T, R, K]`` (the confidence at each recall point)."""
    T, R, K = len(IOU_THRESHOLDS), len(RECALL_POINTS), len(category_ids)
    precision, scores = -np.ones((T, R, K)), -np.ones((T, R, K))
    recall = -np.ones((T, K))
    for k, npig, m in _with_ground_truth(tables, category_ids):
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
    for k, npig, m in _with_ground_truth(tables, category_ids):
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
