"""YOLOv3-tiny learns: trained from scratch on a few synthetic images it finds their objects.

Not a smoke test: the model starts from random weights and must reach mAP@0.5 >= 0.9 on the
images it was trained on, scored by the real pipeline (eval-mode BN, ``postprocess``, class-
aware NMS, boxes mapped back through the letterbox, pycocotools). Small on purpose: 8 images
drawn at varied sizes, letterboxed to 192x224, batch 4, Adam with a one-cycle schedule, one
CPU thread.
"""

from __future__ import annotations

import time

import pytest
import torch

from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.evaluate import evaluate_loader
from hvd_yolo.metrics import coco_ground_truth
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model

INPUT_HW = (192, 224)
N_IMAGES, BATCH, STEPS, LR = 8, 4, 200, 3e-3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_yolov3_tiny_learns_synthetic_shapes():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    samples = make_samples(N_IMAGES, seed=1, size=None, size_range=(160, 240))
    images, metas, targets = [], [], []
    for i, s in enumerate(samples):
        img, boxes, meta = letterbox(torch.from_numpy(s.image.copy()).permute(2, 0, 1),
                                     torch.from_numpy(s.boxes), INPUT_HW)
        meta["image_id"] = i
        images.append(img.float() / 255.0)
        metas.append(meta)
        cls = torch.from_numpy(s.classes).float()[:, None]
        targets.append(torch.cat([torch.full_like(cls, i), cls, boxes], 1))
    x, t = torch.stack(images), torch.cat(targets)
    gt = coco_ground_truth([s.boxes for s in samples], [s.classes for s in samples],
                           [s.image.shape[:2] for s in samples], class_names=CLASS_NAMES)

    model = build_model("yolov3-tiny", len(CLASS_NAMES))
    loss_fn = YoloLoss(model)
    before = evaluate_loader(model, [(x, metas)], gt)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    start, first, losses = time.perf_counter(), None, []
    model.train()
    for _ in range(STEPS):
        idx = torch.randperm(N_IMAGES, generator=g)[:BATCH]
        rows = t[torch.isin(t[:, 0].long(), idx)].clone()
        rows[:, 0] = (rows[:, 0:1].long() == idx[None]).float().argmax(1).float()  # new index
        total, _ = loss_fn(model(x[idx]), rows)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        first = total.item() if first is None else first
        losses.append(total.item())
    figs = evaluate_loader(model, [(x[:4], metas[:4]), (x[4:], metas[4:])], gt)
    print(f"\n{STEPS} steps in {time.perf_counter() - start:.0f} s; loss {first:.4f} -> "
          f"{sum(losses[-10:]) / 10:.4f}; mAP50 {before['mAP50']:.3f} -> {figs['mAP50']:.3f}, "
          f"mAP {before['mAP']:.3f} -> {figs['mAP']:.3f}, per class {figs['per_class_AP']}")
    assert before["mAP50"] < 0.2  # it did not start out knowing the answer
    assert figs["images"] == N_IMAGES
    assert figs["mAP50"] >= 0.9
    assert figs["mAP"] >= 0.4
