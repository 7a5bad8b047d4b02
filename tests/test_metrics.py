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


# ------------------------------------------------------------------ matched pairs and curves
def _noisy_case(seed: int = 5, n: int = 12):
    """Ground truth with crowd boxes, an empty image and a class with no boxes; detections:
    jittered true boxes, false positives, a class without ground truth, scattered scores."""
    import numpy as np

    from hvd_yolo.metrics import coco_ground_truth

    rng = np.random.default_rng(seed)
    samples = make_samples(n, seed=seed, size=None)
    boxes = [s.boxes for s in samples]
    classes = [s.classes for s in samples]
    boxes[3], classes[3] = boxes[3][:0], classes[3][:0]  # an image without boxes
    crowd = [rng.random(len(c)) < 0.15 for c in classes]
    gt = coco_ground_truth(boxes, classes, [s.image.shape[:2] for s in samples],
                           image_ids=[50 + 3 * i for i in range(n)],
                           class_names=[*CLASS_NAMES, "never"], category_ids=[2, 4, 6, 8],
                           ignore=crowd)
    results = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        for a in anns:
            for _ in range(int(rng.integers(0, 3))):  # duplicates give false positives too
                x, y, w, h = a["bbox"]
                j = rng.uniform(-0.3, 0.3, 4) * [w, h, w, h]
                cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice([2, 4, 6]))
                results.append({"image_id": img["id"], "category_id": cat,
                                "bbox": [x + j[0], y + j[1], max(2.0, w + j[2]), max(2.0, h + j[3])],
                                "score": float(rng.uniform(0.01, 0.99))})
        for _ in range(int(rng.integers(0, 4))):  # background detections
            x, y = rng.uniform(0, 100, 2)
            results.append({"image_id": img["id"], "category_id": int(rng.choice([2, 4, 6])),
                            "bbox": [x, y, 20.0, 30.0], "score": float(rng.uniform(0.01, 0.99))})
    return gt, results


def _pycocotools_arrays(gt: dict, results: list[dict], max_det: int = 100) -> dict:
    """pycocotools itself on the same detections: precision [T, R, K], recall, scores."""
    from pycocotools.cocoeval import COCOeval

    from hvd_yolo.metrics import _coco, _quiet

    coco_gt = _coco(gt)
    with _quiet():
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        ev.params.maxDets = [1, 10, max_det]
        ev.evaluate()
        ev.accumulate()
    return {"precision": ev.eval["precision"][:, :, :, 0, -1], "recall": ev.eval["recall"][:, :, 0, -1],
            "scores": ev.eval["scores"][:, :, :, 0, -1], "cat_ids": ev.params.catIds}


def test_precision_from_matched_pairs_equals_pycocotools_arrays():
    import numpy as np

    from hvd_yolo.matches import match_images, precision_recall

    gt, results = _noisy_case()
    assert any(a["iscrowd"] for a in gt["annotations"])
    ref = _pycocotools_arrays(gt, results)
    assert ref["cat_ids"] == [2, 4, 6, 8]
    ids = [img["id"] for img in gt["images"]]
    ours = precision_recall(match_images(results, gt, ids), ref["cat_ids"])
    valid = ref["precision"] > -1
    assert valid[:, :, :3].all() and not valid[:, :, 3].any()  # "never" has no ground truth
    assert 0.1 < ref["precision"][0][valid[0]].mean() < 0.95  # neither trivial nor perfect
    for key in ("precision", "recall", "scores"):
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-12, err_msg=key)


def test_matched_pairs_gathered_from_ranks_equal_one_rank():
    """Two ranks each match their share (with images seen by both: sampler padding); merged in
    rank order they give one rank's curves, F1 and confusion matrix exactly."""
    import numpy as np

    from hvd_yolo.matches import (
        confusion_matrix,
        f1_confidence,
        match_images,
        merge_matches,
        precision_recall,
    )

    gt, results = _noisy_case(seed=9)
    ids = [img["id"] for img in gt["images"]]
    cats = [2, 4, 6, 8]
    whole = match_images(results, gt, ids)
    shares = [ids[0::2] + ids[:2], ids[1::2] + ids[:1]]
    merged = merge_matches([(s, match_images(results, gt, s)) for s in shares])
    for fn in (precision_recall, f1_confidence):
        a, b = fn(whole, cats), fn(merged, cats)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{fn.__name__} {key}")
    np.testing.assert_array_equal(confusion_matrix(whole, cats), confusion_matrix(merged, cats))
    # Counting the images both ranks saw twice would change the figures: the check can fail.
    again = match_images(results, gt, ids[:2])
    doubled = {k: np.concatenate([whole[k], again[k]]) for k in whole}
    assert not np.array_equal(precision_recall(doubled, cats)["precision"],
                              precision_recall(whole, cats)["precision"])


def test_confusion_matrix_and_f1_by_hand():
    import numpy as np

    from hvd_yolo.matches import confusion_matrix, f1_confidence, match_images

    gt = {"images": [{"id": 1, "width": 200, "height": 200}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500},
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 100, 50, 50], "area": 2500},
              {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 120, 40, 40], "area": 1600}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 50, 50], "score": 0.9},  # a -> a
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 48, 50], "score": 0.8},  # b -> a
        {"image_id": 1, "category_id": 2, "bbox": [150, 0, 30, 30], "score": 0.7},  # bg -> b
        {"image_id": 1, "category_id": 2, "bbox": [0, 120, 40, 40], "score": 0.1},  # below conf
    ]
    tables = match_images(results, gt, [1], conf=0.25, iou=0.45)
    m = confusion_matrix(tables, [1, 2])
    # rows true a, b, background; columns predicted a, b, background
    assert m.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    f1 = f1_confidence(tables, [1, 2])
    at = {c: int(np.searchsorted(f1["confidence"], c)) for c in (0.05, 0.5, 0.95)}
    # class a: 2 detections (0.9 TP, 0.8 FP), 1 box; class b: 0.7 FP, 0.1 TP, 2 boxes
    assert f1["precision"][0, at[0.5]] == pytest.approx(0.5)
    assert f1["recall"][0, at[0.5]] == pytest.approx(1.0)
    assert f1["precision"][1, at[0.05]] == pytest.approx(0.5)
    assert f1["recall"][1, at[0.05]] == pytest.approx(0.5)
    assert f1["f1"][1, at[0.5]] == pytest.approx(0.0)
    assert f1["precision"][1, at[0.95]] == 1.0 and f1["recall"][1, at[0.95]] == 0.0
