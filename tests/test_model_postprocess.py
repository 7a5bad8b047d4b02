"""Post-processing: decode, confidence threshold, class-aware NMS, max detections, mapping back."""

from __future__ import annotations

import pytest
import torch

from hvd_yolo.data.transforms import letterbox
from hvd_yolo.model.postprocess import decode, postprocess, to_original
from hvd_yolo.model.yolov3 import build_model
from tests.test_evaluate import OracleModel

torch.set_num_threads(1)


def _run(oracle, image, boxes, classes, scores, **kw):
    oracle.register(image, torch.tensor(boxes), torch.tensor(classes), torch.tensor(scores))
    return postprocess(oracle(image[None]), oracle, **kw)[0]


def test_decodes_the_encoded_boxes():
    oracle = OracleModel(num_classes=3)
    image = torch.rand(3, 128, 192)
    boxes = [[10.0, 20.0, 50.0, 70.0], [100.0, 30.0, 180.0, 120.0]]
    det = _run(oracle, image, boxes, [2, 0], [0.8, 0.6])
    assert det.shape == (2, 6)
    assert torch.allclose(det[:, :4], torch.tensor(boxes), atol=1e-3)
    assert torch.allclose(det[:, 4], torch.tensor([0.8, 0.6]), atol=1e-4)  # best first
    assert det[:, 5].tolist() == [2.0, 0.0]


def test_confidence_threshold_and_max_det():
    oracle = OracleModel(num_classes=1)
    image = torch.rand(3, 256, 256)
    boxes = [[20.0 * i, 5.0, 20.0 * i + 15, 20.0] for i in range(12)]
    scores = [0.05 + 0.07 * i for i in range(12)]
    det = _run(oracle, image, boxes, [0] * 12, scores, conf_thres=0.3)
    assert len(det) == sum(s > 0.3 for s in scores)
    assert (det[:, 4] > 0.3).all() and (det[:, 4][:-1] >= det[:, 4][1:]).all()
    det = postprocess(oracle(image[None]), oracle, conf_thres=0.001, max_det=4)[0]
    assert len(det) == 4 and det[0, 4] == pytest.approx(max(scores), abs=1e-4)


def test_nms_is_class_aware():
    oracle = OracleModel(num_classes=3)
    image = torch.rand(3, 128, 128)
    a = [20.0, 20.0, 80.0, 90.0]
    b = [22.0, 21.0, 82.0, 92.0]  # IoU with a ~0.9
    # Same class: the weaker duplicate goes; other class: both stay.
    det = _run(oracle, image, [a, b], [1, 1], [0.9, 0.7], iou_thres=0.6)
    assert det[:, 4].tolist() == pytest.approx([0.9], abs=1e-4)
    image2 = torch.rand(3, 128, 128)
    det = _run(oracle, image2, [a, b], [1, 2], [0.9, 0.7], iou_thres=0.6)
    assert sorted(det[:, 5].tolist()) == [1.0, 2.0]
    det = postprocess(oracle(image2[None]), oracle, iou_thres=0.6, agnostic=True)[0]
    assert len(det) == 1


def test_multi_label_keeps_every_class_above_threshold():
    model = build_model("yolov3-tiny", 2)
    out = [torch.full(o, -10.0) for o in model.output_shapes(64, 64)]
    out[0][0, 0, 1, 1, :5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])
    out[0][0, 0, 1, 1, 5:] = torch.tensor([2.0, 1.0])  # both classes likely
    single = postprocess(out, model, conf_thres=0.5)[0]
    multi = postprocess(out, model, conf_thres=0.5, multi_label=True)[0]
    assert single[:, 5].tolist() == [0.0] and sorted(multi[:, 5].tolist()) == [0.0, 1.0]
    # Darknet decoding: centre (0.5 + cell) * 32, size = anchor (t = 0), anchor 81x82.
    assert torch.allclose(single[0, :4], torch.tensor([7.5, 7.0, 64.0, 64.0]))


def test_boxes_are_clipped_to_the_input_and_mapped_back():
    oracle = OracleModel(num_classes=1)
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    lb, _, meta = letterbox(image, None, 128)  # scale 0.64, pad top 32
    x = lb.float() / 255
    det = _run(oracle, x, [[-30.0, 40.0, 64.0, 80.0]], [0], [0.9])
    assert det[0, :4].tolist() == pytest.approx([0.0, 40.0, 64.0, 80.0], abs=1e-3)
    back = to_original(det, meta)
    assert back[0, :4].tolist() == pytest.approx([0.0, 12.5, 100.0, 75.0], abs=1e-2)


def test_decode_covers_every_cell_and_anchor():
    model = build_model("yolov3", 5)
    out = [torch.zeros(s) for s in model.output_shapes(96, 160, batch=2)]
    boxes, probs = decode(out, model)
    n = 3 * (3 * 5 + 6 * 10 + 12 * 20)
    assert boxes.shape == (2, n, 4) and probs.shape == (2, n, 6)
    assert torch.allclose(probs, torch.full_like(probs, 0.5))


def test_bad_thresholds():
    model = build_model("yolov3-tiny", 2)
    out = [torch.zeros(s) for s in model.output_shapes(64, 64)]
    with pytest.raises(ValueError, match="conf_thres"):
        postprocess(out, model, conf_thres=1.5)
