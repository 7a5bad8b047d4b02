"""COCO mAP with pycocotools: perfect detections, a hand-worked AP, export, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples
from hvd_yolo.metrics import coco_evaluate, coco_ground_truth, to_coco_results


def _gt_as_results(gt: dict, score: float = 0.9) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": score} for a in gt["annotations"]]


def test_ground_truth_as_detections_scores_one(capsys):
    samples = make_samples(6, seed=11, size=None)
    gt = coco_ground_truth([s.boxes for s in samples], [s.classes for s in samples],
                           [s.image.shape[:2] for s in samples], image_ids=range(10, 16),
                           class_names=CLASS_NAMES, category_ids=[3, 7, 11])
    figs = coco_evaluate(gt, _gt_as_results(gt))
    assert figs["mAP"] == pytest.approx(1.0) and figs["mAP50"] == pytest.approx(1.0)
    present = {CLASS_NAMES[int(c)] for s in samples for c in s.classes}
    assert set(figs["per_class_AP"]) == present
    assert all(v == pytest.approx(1.0) for v in figs["per_class_AP"].values())
    assert figs["images"] == 6 and figs["detections"] == len(gt["annotations"])
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    json.dumps(figs)  # plain JSON-able figures


def test_hand_worked_average_precision():
    # Image 1: two "a" boxes; image 2: one "b" box.
    gt = {
        "images": [{"id": 1, "width": 400, "height": 300}, {"id": 2, "width": 400, "height": 300}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [200, 100, 80, 60]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 100]},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 1, "bbox": [300, 200, 40, 40], "score": 0.8},  # FP
        {"image_id": 1, "category_id": 1, "bbox": [200, 100, 80, 60], "score": 0.7},  # TP
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 100, 62], "score": 0.6},  # IoU 0.62
    ]
    figs = coco_evaluate(gt, dets)
    # Class "a" (IoU 1 or 0, so the same at every threshold). Ranked by score:
    #   0.9 TP -> precision 1/1, recall 1/2;  0.8 FP -> 1/2, 1/2;  0.7 TP -> 2/3, 2/2.
    # COCO makes precision non-increasing from the right: [1, 2/3, 2/3], and reads it at the 101
    # recall points 0, 0.01 .. 1: the 51 points r <= 0.5 get 1, the 50 points r > 0.5 get 2/3.
    ap_a = (51 * 1 + 50 * 2 / 3) / 101  # = 0.834983...
    # Class "b": one detection with IoU 6200/10000 = 0.62 with its box: a TP (AP 1) at IoU
    # thresholds 0.50, 0.55, 0.60 and a miss (AP 0) at 0.65 .. 0.95 -> AP@[.5:.95] = 3/10.
    ap_b = 3 / 10
    assert figs["per_class_AP"]["a"] == pytest.approx(ap_a, abs=1e-9)
    assert figs["per_class_AP"]["b"] == pytest.approx(ap_b, abs=1e-9)
    assert figs["mAP"] == pytest.approx((ap_a + ap_b) / 2, abs=1e-9)  # 0.567492
    assert figs["mAP50"] == pytest.approx((ap_a + 1.0) / 2, abs=1e-9)  # 0.917492
    # By COCO's area ranges: both "a" boxes are medium (32² .. 96² px), the "b" box is large.
    assert figs["AP_medium"] == pytest.approx(ap_a, abs=1e-9)
    assert figs["AP_large"] == pytest.approx(ap_b, abs=1e-9)
    assert math.isnan(figs["AP_small"])  # no small ground truth to score
    # Only image 2 evaluated: class "a" has no ground truth there and drops out.
    only2 = coco_evaluate(gt, dets, image_ids=[2])
    assert only2["per_class_AP"] == {"b": pytest.approx(0.3)} and only2["images"] == 1
    assert only2["detections"] == 1


def test_no_detections_scores_zero_and_no_images_is_nan():
    gt = coco_ground_truth([torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([0])], [(20, 20)])
    figs = coco_evaluate(gt, [])
    assert figs["mAP"] == 0.0 and figs["mAP50"] == 0.0 and figs["per_class_AP"] == {"0": 0.0}
    empty = coco_evaluate(gt, [], image_ids=[])
    assert math.isnan(empty["mAP"]) and empty["images"] == 0


def test_unknown_image_ids_are_an_error():
    gt = coco_ground_truth([torch.zeros(0, 4)], [torch.zeros(0)], [(20, 20)], image_ids=[5])
    with pytest.raises(ValueError, match=r"not in the ground truth, e.g. \[6\]"):
        coco_evaluate(gt, [], image_ids=[5, 6])


def test_export_maps_contiguous_classes_to_category_ids():
    det = torch.tensor([[10.0, 20.0, 50.0, 80.0, 0.75, 1.0], [0.0, 0.0, 5.5, 6.25, 0.5, 0.0]])
    res = to_coco_results(det, image_id=42, category_ids=[17, 90])
    assert res == [
        {"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75},
        {"image_id": 42, "category_id": 17, "bbox": [0.0, 0.0, 5.5, 6.25], "score": 0.5},
    ]
    assert [r["category_id"] for r in to_coco_results(det, 1)] == [1, 0]
    with pytest.raises(ValueError, match="class 1 has no entry in category_ids"):
        to_coco_results(det, 1, category_ids=[17])


def test_max_det_limits_what_is_scored():
    # 150 detections on one image, the true one ranked last: with 100 it is never seen.
    gt = coco_ground_truth([torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([0])], [(500, 500)])
    dets = [{"image_id": 0, "category_id": 0, "bbox": [300.0 + i, 300.0, 5.0, 5.0],
             "score": 0.9} for i in range(149)]
    dets.append({"image_id": 0, "category_id": 0, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.1})
    assert coco_evaluate(gt, dets, max_det=100)["mAP50"] == 0.0
    assert coco_evaluate(gt, dets, max_det=150)["mAP50"] > 0.0
