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

