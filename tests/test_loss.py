"""YoloLoss: assignment rule, per-image mean contract, zero boxes, exact boxes cost ~nothing."""

from __future__ import annotations

import math

import pytest
import torch

from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return build_model("yolov3", 4)


def _outputs(model, batch: int, h: int, w: int, seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    shapes = model.output_shapes(h, w, batch)
    return [(torch.randn(s, generator=g) * 0.5).requires_grad_(requires_grad) for s in shapes]


def _encode(model, box, scale: int, anchor: int, out):
    """Write raw values into ``out`` that decode exactly to ``box`` at (scale, anchor)."""
    stride = model.strides[scale]
    cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
    gx, gy = int(cx), int(cy)
    aw, ah = model.anchors[scale][anchor]
    with torch.no_grad():
        p = out[scale][0, anchor, gy, gx]
        p[0] = math.log((cx - gx) / (1 - (cx - gx)))
        p[1] = math.log((cy - gy) / (1 - (cy - gy)))
        p[2] = math.log((box[2] - box[0]) / aw)
        p[3] = math.log((box[3] - box[1]) / ah)


def test_assignment_rule(model):
    loss = YoloLoss(model)
    grids = [(13, 13), (26, 26), (52, 52)]
    # A 50x50 box centred at (100, 200): anchors within 4x in both sides are positives.
    t = torch.tensor([[0, 1, 75.0, 175.0, 125.0, 225.0]])
    pos = loss.assign(t, grids)
    got = {(s, a, int(gy), int(gx)) for s, (_, aa, yy, xx) in enumerate(pos)
           for a, gy, gx in zip(aa.tolist(), yy, xx)}
    expected = set()
    for s, stride in enumerate(model.strides):
        for a, (aw, ah) in enumerate(model.anchors[s]):
            if max(50 / aw, aw / 50, 50 / ah, ah / 50) < 4:
                expected.add((s, a, 200 // stride, 100 // stride))
    assert got == expected
    assert (0, 2, 6, 3) not in got and (2, 0, 25, 12) not in got  # 373x326 and 10x13: > 4x
    assert len(got) == 7
    # A huge box (no anchor within 4x) still gets its best-IoU anchor: 373x326 at stride 32.
    pos = loss.assign(torch.tensor([[0, 0, 0.0, 0.0, 1600.0, 1400.0]]), grids)
    assert [len(p[0]) for p in pos] == [1, 0, 0]
    assert pos[0][1].tolist() == [2] and (pos[0][2].item(), pos[0][3].item()) == (12, 12)
    # A tiny 2x2 box: its best anchor is 10x13 at stride 8 (cell of its centre).
    pos = loss.assign(torch.tensor([[0, 0, 99.0, 99.0, 101.0, 101.0]]), grids)
    assert [len(p[0]) for p in pos] == [0, 0, 1] and pos[2][1].tolist() == [0]
    assert (pos[2][2].item(), pos[2][3].item()) == (12, 12)


def test_loss_is_a_mean_of_per_image_losses(model):
    """Batch [A, B] == mean(batch [A], batch [B]): loss and gradients (the Horovod contract)."""
    loss = YoloLoss(model)
    out = _outputs(model, 2, 128, 192)
    # Image 0 has three boxes, image 1 one: a batch-wide positive count would break this.
    targets = torch.tensor([[0, 0, 10.0, 10.0, 60.0, 50.0], [0, 3, 70.0, 20.0, 180.0, 120.0],
                            [0, 2, 100.0, 80.0, 110.0, 95.0], [1, 1, 30.0, 40.0, 90.0, 100.0]])
    total, parts = loss(out, targets)
    total.backward()
    grads = [o.grad.clone() for o in out]
    halves = []
    for i in range(2):
        o_i = [o.detach()[i:i + 1].clone().requires_grad_(True) for o in out]
        t_i = targets[targets[:, 0] == i].clone()
        t_i[:, 0] = 0
        tot_i, parts_i = loss(o_i, t_i)
        (tot_i / 2).backward()
        halves.append((tot_i, parts_i, o_i))
    assert total.item() == pytest.approx((halves[0][0] + halves[1][0]).item() / 2, rel=1e-5)
    for k in ("box", "obj", "cls"):
        assert parts[k].item() == pytest.approx(
            (halves[0][1][k] + halves[1][1][k]).item() / 2, rel=1e-5, abs=1e-8)
    for s, g in enumerate(grads):
        assert torch.allclose(g[0], halves[0][2][s].grad[0], atol=1e-7)
        assert torch.allclose(g[1], halves[1][2][s].grad[0], atol=1e-7)
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)


def test_images_with_zero_boxes(model):
    loss = YoloLoss(model)
    out = _outputs(model, 3, 96, 96)
    total, parts = loss(out, torch.zeros((0, 6)))
    assert torch.isfinite(total) and parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0
    total.backward()
    assert all(torch.isfinite(o.grad).all() for o in out)
    # One image with boxes among empty ones: the empty ones contribute objectness only.
    out = _outputs(model, 3, 96, 96)
    total, parts = loss(out, torch.tensor([[1, 0, 10.0, 10.0, 40.0, 50.0]]))
    total.backward()
    assert parts["box"] > 0 and out[0].grad[0, ..., :4].abs().sum() == 0


def test_exact_prediction_has_near_zero_box_loss(model):
    loss = YoloLoss(model, box_loss="ciou")
    box = [37.0, 21.0, 92.0, 80.0]  # 55x59, centre off every cell corner
    targets = torch.tensor([[0, 2, *box]])
    out = _outputs(model, 1, 128, 128, requires_grad=False)
    for s, (_, a_idx, _, _) in enumerate(loss.assign(targets, [(4, 4), (8, 8), (16, 16)])):
        for a in a_idx.tolist():
            _encode(model, box, s, a, out)
    _, exact = loss(out, targets)
    assert exact["box"].item() < 1e-6
    out[1][0, :, :, :, 2:4] += 0.3  # boxes 35% too large at stride 16
    _, worse = loss(out, targets)
    assert worse["box"].item() > 1e-3


@pytest.mark.parametrize("kind", ["ciou", "giou"])
def test_optimising_raw_outputs_lowers_every_part(model, kind):
    loss = YoloLoss(model, box_loss=kind)
    out = _outputs(model, 2, 64, 96, seed=3)
    targets = torch.tensor([[0, 0, 5.0, 5.0, 40.0, 30.0], [1, 3, 20.0, 10.0, 90.0, 60.0]])
    opt = torch.optim.Adam(out, lr=0.05)
    first, p0 = loss(out, targets)
    for _ in range(60):
        total, parts = loss(out, targets)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.3 * first.item()
    assert all(parts[k] < p0[k] for k in ("box", "obj", "cls"))


def test_bad_targets_are_clear_errors(model):
    loss = YoloLoss(model)
    out = _outputs(model, 2, 64, 64)
    with pytest.raises(ValueError, match=r"class must be an integer in \[0, 4\), got \[7.0\]"):
        loss(out, torch.tensor([[0, 7, 1.0, 1.0, 9.0, 9.0]]))
    with pytest.raises(ValueError, match=r"batch_index must be integers in \[0, 2\)"):
        loss(out, torch.tensor([[2, 0, 1.0, 1.0, 9.0, 9.0]]))
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        loss(out, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        loss(out, torch.tensor([[0, 0, float("nan"), 1.0, 9.0, 9.0]]))
    with pytest.raises(ValueError, match="box_loss"):
        YoloLoss(model, box_loss="iou")
    # Degenerate (zero-area) boxes are ignored, not an error.
    total, parts = loss(out, torch.tensor([[0, 0, 5.0, 5.0, 5.0, 20.0]]))
    assert parts["box"] == 0


def test_tiny_model_two_scales():
    tiny = build_model("yolov3-tiny", 1)
    loss = YoloLoss(tiny)
    out = _outputs(tiny, 2, 96, 128)
    total, parts = loss(out, torch.tensor([[1, 0, 10.0, 10.0, 60.0, 80.0]]))
    total.backward()
    assert parts["cls"] == 0  # one class: no class loss, like Darknet/ultralytics
    assert parts["box"] > 0 and torch.isfinite(total)


def test_pairwise_iou_equals_the_diagonal_of_box_iou():
    """The loss's objectness target: identical values to ``box_iou(a, b).diagonal()``."""
    from torchvision.ops import box_iou

    from hvd_yolo.model.loss import pairwise_iou

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 500, 2, generator=g) * 100
    wh = torch.rand(2, 500, 2, generator=g) * 60 + 0.5  # many disjoint pairs too
    a, b = (torch.cat([xy[i], xy[i] + wh[i]], 1) for i in (0, 1))
    expected = box_iou(a, b).diagonal()
    assert torch.equal(pairwise_iou(a, b), expected)
    assert (expected == 0).any() and (expected > 0.2).any()


def test_loss_memory_is_linear_in_the_number_of_positives():
    """~2000 positives: no operation of the loss allocates anything near an n x n tensor."""
    from torch.profiler import ProfilerActivity, profile

    tiny = build_model("yolov3-tiny", 3)
    loss = YoloLoss(tiny)
    out = _outputs(tiny, 1, 64, 64, requires_grad=False)
    g = torch.Generator().manual_seed(1)
    n = 1000
    xy = torch.rand(n, 2, generator=g) * 30
    wh = torch.rand(n, 2, generator=g) * 30 + 8
    cls = torch.randint(0, 3, (n, 1), generator=g).float()
    targets = torch.cat([torch.zeros(n, 1), cls, xy, xy + wh], 1)
    positives = sum(len(t) for t, *_ in loss.assign(targets, [(2, 2), (4, 4)]))
    assert positives > 1500
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss(out, targets)
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    quarter_of_n_by_n = positives**2  # bytes: a quarter of one n x n float32 matrix
    assert biggest < quarter_of_n_by_n, f"one op allocated {biggest} bytes for {positives} positives"
