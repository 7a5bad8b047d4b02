"""YOLOv3 / YOLOv3-tiny: Darknet structure, parameter counts, any input size divisible by 32."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hvd_yolo.model.darknet_io import darknet_float_count
from hvd_yolo.model.yolov3 import (
    ConvLayer,
    MaxPool,
    Route,
    Shortcut,
    YoloLayer,
    anchors_in_weights,
    build_model,
    count_parameters,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def yolov3():
    torch.manual_seed(0)
    return build_model("yolov3", 80).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("yolov3-tiny", 80).eval()


def test_parameter_counts_match_darknet_and_ultralytics(yolov3, tiny):
    assert count_parameters(yolov3) == 61_949_149
    # The usual yolov3-tiny figure 8,858,734 is the float count of yolov3-tiny.weights, which
    # also stores each BN layer's running mean and variance (3,184 channels x 2 = 6,368).
    assert count_parameters(tiny) == 8_852_366
    assert darknet_float_count(tiny) == 8_858_734
    # Published file sizes: 20-byte header + 4 bytes per float.
    assert darknet_float_count(yolov3) * 4 + 20 == 248_007_048  # yolov3.weights
    assert darknet_float_count(yolov3, 74) * 4 + 20 == 162_482_580  # darknet53.conv.74
    assert darknet_float_count(tiny) * 4 + 20 == 35_434_956  # yolov3-tiny.weights


def test_layers_follow_darknet_cfg_order(yolov3, tiny):
    layers = list(yolov3.layers)
    assert len(layers) == 107 and sum(isinstance(m, ConvLayer) for m in layers) == 75
    assert [i for i, m in enumerate(layers) if isinstance(m, YoloLayer)] == [82, 94, 106]
    assert [m.sources for i, m in enumerate(layers) if isinstance(m, Route)] == \
        [(79,), (85, 61), (91,), (97, 36)]
    assert isinstance(layers[4], Shortcut) and layers[4].sources == (1,)
    assert len(yolov3.conv_layers(74)) == 52  # Darknet-53 without its classifier
    t = list(tiny.layers)
    assert len(t) == 24 and [i for i, m in enumerate(t) if isinstance(m, YoloLayer)] == [16, 23]
    assert isinstance(t[11], MaxPool) and t[11].stride == 1
    assert [m.sources for m in t if isinstance(m, Route)] == [(13,), (19, 8)]
    assert len(tiny.conv_layers(15)) == 9
    # Detection convs are linear with a bias; all others conv + BN without bias.
    for m in (yolov3, tiny):
        for i, layer in enumerate(m.layers):
            if isinstance(layer, ConvLayer):
                is_head = isinstance(m.layers[i + 1], YoloLayer)
                assert (layer.bn is None) == is_head
                assert (layer.conv.bias is not None) == is_head


def test_attributes(yolov3, tiny):
    assert yolov3.name == "yolov3" and yolov3.num_classes == 80
    assert yolov3.strides == (32, 16, 8) and tiny.strides == (32, 16)
    assert yolov3.num_anchors == 3 and tiny.num_anchors == 3


# The official cfgs' anchors and masks (pjreddie/darknet cfg/yolov3.cfg, cfg/yolov3-tiny.cfg),
# as written there; each [yolo] section's mask picks its anchors.
OFFICIAL_CFG = {
    "yolov3": ("10,13,  16,30,  33,23,  30,61,  62,45,  59,119,  116,90,  156,198,  373,326",
               ["6,7,8", "3,4,5", "0,1,2"]),
    "yolov3-tiny": ("10,14,  23,27,  37,58,  81,82,  135,169,  344,319", ["3,4,5", "0,1,2"]),
}


@pytest.mark.parametrize("name", ["yolov3", "yolov3-tiny"])
def test_default_anchors_are_the_official_cfgs(name, yolov3, tiny):
    text, masks = OFFICIAL_CFG[name]
    values = [float(v) for v in text.replace(",", " ").split()]
    pairs = list(zip(values[::2], values[1::2]))
    expected = [[pairs[int(i)] for i in mask.split(",")] for mask in masks]
    model = yolov3 if name == "yolov3" else tiny
    assert model.anchors == expected  # list (one per output, large stride first) of (w, h)
    assert model.anchor_wh.tolist() == [[list(p) for p in s] for s in expected]
    assert all(isinstance(w, float) for s in model.anchors for p in s for w in p)


def test_tiny_stride16_head_uses_mask_012_not_the_forks_123(tiny):
    assert tiny.anchors[1] == [(10.0, 14.0), (23.0, 27.0), (37.0, 58.0)]


@pytest.mark.parametrize("name", ["yolov3", "yolov3-tiny"])
@pytest.mark.parametrize("hw", [(320, 320), (416, 416), (608, 608), (288, 512)])
def test_output_shapes_any_size_divisible_by_32(name, hw, yolov3, tiny):
    model = yolov3 if name == "yolov3" else tiny
    h, w = hw
    with torch.no_grad():
        out = model(torch.rand(1, 3, h, w))
    expected = [(1, 3, h // s, w // s, 85) for s in model.strides]
    assert [tuple(o.shape) for o in out] == expected == model.output_shapes(h, w)
    assert all(torch.isfinite(o).all() for o in out)


def test_input_size_not_divisible_by_32_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"400x416 is not divisible by 32.*multiple of 32"):
        tiny(torch.rand(1, 3, 400, 416))
    with pytest.raises(ValueError, match="not divisible by 32"):
        tiny.output_shapes(416, 400)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny(torch.rand(1, 1, 416, 416))


@pytest.mark.parametrize("classes", [1, 3, 20])
def test_any_class_count(classes):
    model = build_model("yolov3-tiny", classes).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 256, 320))
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 10, 5 + classes), (2, 3, 16, 20, 5 + classes)]


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model 'yolov4'.*yolov3, yolov3-tiny"):
        build_model("yolov4", 80)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("yolov3", 0)


@pytest.mark.parametrize("anchors, message", [
    ([[(10, 13)] * 3], "1 scales given, the model has 2 outputs"),
    ([[(10, 13)] * 3, [(5, 6)] * 2], r"same number of anchors, got \[3, 2\]"),
    ([[(10, 13)] * 3, [(5, 0)] * 3], r"positive pixels, got \(5.0, 0.0\)"),
    ([[(10, 13)] * 3, [(5, -1)] * 3], "positive pixels"),
    ([[(10, 13)] * 3, [(5, float("nan"))] * 3], "positive pixels"),
    ([[(10, 13, 4)] * 3, [(5, 6)] * 3], r"list of \[w, h\] pairs"),
    ([[10, 13], [5, 6]], r"list of \[w, h\] pairs"),
    ([["a", "b"], [(5, 6)]], r"list of \[w, h\] pairs"),
    ([[], []], "at least one"),
])
def test_bad_anchors_are_named(anchors, message):
    with pytest.raises(ValueError, match=message):
        build_model("yolov3-tiny", 3, anchors=anchors)


@pytest.mark.parametrize("per_scale", [2, 3, 4])
def test_custom_anchors(per_scale):
    anchors = [[(50 + i, 60 + i) for i in range(per_scale)], [(5 + i, 6 + i) for i in range(per_scale)]]
    model = build_model("yolov3-tiny", 2, anchors=anchors).eval()
    assert model.anchors == [[(float(w), float(h)) for w, h in s] for s in anchors]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(1, per_scale, 2, 3, 7), (1, per_scale, 4, 6, 7)]
    # The anchors travel with the weights: a state_dict loads them into a default model.
    other = build_model("yolov3-tiny", 2, anchors=[[(1, 1)] * per_scale] * 2)
    other.load_state_dict(model.state_dict())
    assert other.anchors == model.anchors


def test_old_state_dicts_with_an_anchors_key_load():
    # Checkpoints written before model.anchors held the buffer under "anchors".
    model = build_model("yolov3-tiny", 2)
    old = {("anchors" if k == "anchor_wh" else k): v for k, v in model.state_dict().items()}
    old["anchors"] = torch.tensor([[[81.0, 82], [135, 169], [344, 319]], [[23, 27], [37, 58], [81, 82]]])
    fresh = build_model("yolov3-tiny", 2)
    fresh.load_state_dict(old)
    assert fresh.anchors[1] == [(23.0, 27.0), (37.0, 58.0), (81.0, 82.0)]
    assert anchors_in_weights(old) == fresh.anchors == anchors_in_weights(fresh.state_dict())


def test_stride1_maxpool_pads_like_darknet():
    # Darknet's size-2 stride-1 maxpool treats the out-of-image cells as -inf.
    x = torch.randn(1, 4, 5, 7) - 3.0  # negative values: zero padding would be wrong
    ref = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)
    assert torch.equal(MaxPool(2, 1)(x), ref)


def test_backward_reaches_every_parameter(tiny):
    model = build_model("yolov3-tiny", 3).train()
    out = model(torch.rand(2, 3, 128, 160))
    sum(o.float().pow(2).mean() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flops_match_darknet(yolov3, tiny):
    # Darknet prints 65.879 / 5.571 BFLOPs at 416 (its total adds shortcut/maxpool ops; the
    # convolutions, which we count, are within 0.15% of it).
    assert yolov3.flops(416, 416) / 1e9 == pytest.approx(65.879, rel=1.5e-3)
    assert tiny.flops(416, 416) / 1e9 == pytest.approx(5.571, rel=1.5e-3)
