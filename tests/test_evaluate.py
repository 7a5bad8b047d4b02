"""Evaluation runner: detections in original pixels, dedup of padding, 2 ranks == 1 rank.

``OracleModel`` is a test double with the YOLO model's interface whose raw maps decode to
chosen boxes for chosen images; it lets the tests check letterbox -> decode -> NMS ->
unletterbox -> COCO end to end with known answers. The real YOLOv3-tiny runs too.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples
from hvd_yolo.data.transforms import letterbox
from hvd_yolo.evaluate import detect_batch, evaluate_loader, merge_rank_results
from hvd_yolo.metrics import coco_evaluate, coco_ground_truth
from hvd_yolo.model.yolov3 import build_model

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class OracleModel(nn.Module):
    """Returns raw YOLO maps that decode to the boxes registered for each input image."""

    def __init__(self, name: str = "yolov3-tiny", num_classes: int = 3):
        super().__init__()
        ref = build_model(name, num_classes)
        self.name, self.num_classes, self.strides = "oracle", num_classes, ref.strides
        self.register_buffer("anchors", torch.tensor(ref.anchors))
        self.weight = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def register(self, image: torch.Tensor, boxes, classes, scores) -> None:
        """Detections for ``image``: boxes ``[k, 4]`` input pixels, classes, scores in (0, 1)."""
        self.table[_key(image)] = (torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                                   torch.as_tensor(classes).reshape(-1),
                                   torch.as_tensor(scores, dtype=torch.float64).reshape(-1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
        out = [torch.full((b, 3, h // s, w // s, 5 + self.num_classes), -14.0)
               for s in self.strides]
        for i in range(b):
            boxes, classes, scores = self.table[_key(images[i])]
            used = set()
            for box, c, sc in zip(boxes.tolist(), classes.tolist(), scores.tolist()):
                bw, bh = box[2] - box[0], box[3] - box[1]
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                # Try the anchors in order of shape fit; skip a slot another box took.
                slots = sorted(((max(bw / aw, aw / bw, bh / ah, ah / bh), s, a)
                                for s in range(len(self.strides))
                                for a, (aw, ah) in enumerate(self.anchors[s].tolist())))
                for _, s, a in slots:
                    stride = self.strides[s]
                    gx, gy = int(cx // stride), int(cy // stride)
                    if (s, a, gy, gx) not in used:
                        break
                used.add((s, a, gy, gx))
                fx = min(max(cx / stride - gx, 1e-6), 1 - 1e-6)
                fy = min(max(cy / stride - gy, 1e-6), 1 - 1e-6)
                aw, ah = self.anchors[s, a].tolist()
                p = out[s][i, a, gy, gx]
                p[0], p[1] = math.log(fx / (1 - fx)), math.log(fy / (1 - fy))
                p[2], p[3] = math.log(bw / aw), math.log(bh / ah)
                p[4] = math.log(sc / (1 - sc))
                p[5:] = -14.0
                p[5 + int(c)] = 14.0
        return out


@dataclass
class Case:
    """Synthetic images of varied sizes letterboxed to 256x320, their COCO ground truth, a
    noisy oracle (jittered boxes, a false positive per image, random scores) and a real
    (untrained, seeded) YOLOv3-tiny."""

    images: list[torch.Tensor]
    metas: list[dict]
    gt: dict
    category_ids: list[int]
    oracle: OracleModel
    exact: OracleModel
    real: nn.Module

    def batches(self, indices, batch_size: int = 2):
        idx = list(indices)
        return [(torch.stack([self.images[i] for i in idx[k:k + batch_size]]),
                 [self.metas[i] for i in idx[k:k + batch_size]])
                for k in range(0, len(idx), batch_size)]


def build_case(n: int = 5, size=(256, 320), seed: int = 3) -> Case:
    samples = make_samples(n, seed=seed, size=None)
    category_ids = [1, 5, 9]
    image_ids = [100 + 7 * i for i in range(n)]
    gt = coco_ground_truth([s.boxes for s in samples], [s.classes for s in samples],
                           [s.image.shape[:2] for s in samples], image_ids=image_ids,
                           class_names=CLASS_NAMES, category_ids=category_ids)
    oracle, exact = OracleModel(), OracleModel()
    images, metas = [], []
    for i, s in enumerate(samples):
        img, boxes, meta = letterbox(torch.from_numpy(s.image.copy()).permute(2, 0, 1),
                                     torch.from_numpy(s.boxes), size)
        meta["image_id"] = image_ids[i]
        image = img.float() / 255.0
        images.append(image)
        metas.append(meta)
        classes = torch.from_numpy(s.classes)
        exact.register(image, boxes, classes, torch.full((len(boxes),), 0.9))
        rng = np.random.default_rng(1000 + i)
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        noisy = boxes + torch.from_numpy(rng.uniform(-0.15, 0.15, boxes.shape)).float() * wh
        fp = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
        oracle.register(image, torch.cat([noisy, fp]),
                        torch.cat([classes, torch.tensor([int(rng.integers(0, 3))])]),
                        rng.uniform(0.05, 0.95, len(boxes) + 1))
    torch.manual_seed(0)
    real = build_model("yolov3-tiny", 3).eval()
    return Case(images, metas, gt, category_ids, oracle, exact, real)


@pytest.fixture(scope="module")
def case() -> Case:
    return build_case()


def test_exact_detections_score_one_through_letterbox_and_back(case):
    figs = evaluate_loader(case.exact, case.batches(range(5)), case.gt, case.category_ids)
    assert figs["mAP"] == pytest.approx(1.0) and figs["mAP50"] == pytest.approx(1.0)
    assert figs["images"] == 5 and figs["detections"] == len(case.gt["annotations"])


def test_detect_batch_returns_original_pixels_and_category_ids(case):
    res = detect_batch(case.exact, *case.batches([2], 1)[0], conf_thres=0.5,
                       category_ids=case.category_ids)
    gt = [a for a in case.gt["annotations"] if a["image_id"] == case.metas[2]["image_id"]]
    assert len(res) == len(gt)
    for a in gt:
        match = [r for r in res if r["category_id"] == a["category_id"]
                 and np.allclose(r["bbox"], a["bbox"], atol=0.01)]
        assert len(match) == 1 and match[0]["score"] == pytest.approx(0.9, abs=1e-4)
        assert match[0]["image_id"] == case.metas[2]["image_id"]


def test_padding_duplicates_on_one_rank_are_scored_once(case):
    once = evaluate_loader(case.oracle, case.batches(range(5)), case.gt, case.category_ids)
    padded = evaluate_loader(case.oracle, case.batches([0, 1, 2, 3, 4, 0, 1, 1]), case.gt,
                             case.category_ids)
    assert 0 < once["mAP"] < 1
    assert padded == once
    # Counting the duplicates would change the figure: the check above can fail.
    dup = [r for i in [0, 1, 2, 3, 4, 0, 1, 1]
           for r in detect_batch(case.oracle, *case.batches([i], 1)[0],
                                 category_ids=case.category_ids)]
    assert coco_evaluate(case.gt, dup)["mAP"] < once["mAP"]


def test_merge_keeps_each_image_from_its_first_rank():
    r0 = ([1, 2], np.array([[1, 0, 0, 0, 5, 5, 0.9], [2, 0, 0, 0, 5, 5, 0.8]]))
    r1 = ([3, 1], np.array([[3, 0, 0, 0, 5, 5, 0.7], [1, 0, 1, 1, 5, 5, 0.6],
                            [3, 0, 0, 0, 5, 5, 0.7]]))  # image 1 again, a repeated row
    results, ids = merge_rank_results([r0, r1])
    assert ids == [1, 2, 3]
    assert [(r["image_id"], r["score"]) for r in results] == [(1, 0.9), (2, 0.8), (3, 0.7)]


def test_evaluation_restores_training_mode(case):
    model = case.real
    model.train()
    figs = evaluate_loader(model, case.batches(range(2)), case.gt, case.category_ids)
    assert model.training and figs["images"] == 2 and figs["detections"] > 0
    model.eval()


def _one_rank_figures(case: Case) -> dict:
    return {"oracle": evaluate_loader(case.oracle, case.batches(range(5)), case.gt,
                                      case.category_ids),
            "real": evaluate_loader(case.real, case.batches(range(5), 1), case.gt,
                                    case.category_ids)}


@pytest.mark.mpi
def test_two_rank_evaluation_equals_one_rank(case):
    from tests.mpi_harness import run_python

    # 5 images, 8 sampler slots: rank 0 gets [0, 2, 4, 1], rank 1 [1, 3, 0, 1]: image 0 and 1
    # are on both ranks, image 1 twice on rank 1.
    job = run_python(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from hvd_yolo.comm import horovod as dist
        from hvd_yolo.evaluate import evaluate_loader
        from tests.test_evaluate import build_case
        ctx = dist.init(threads=1)
        case = build_case()
        order = [0, 1, 2, 3, 4, 0, 1, 1]
        mine = order[ctx.rank::ctx.size]
        print(f"mine={{mine}}")
        oracle = evaluate_loader(case.oracle, case.batches(mine), case.gt, case.category_ids)
        real = evaluate_loader(case.real, case.batches(mine, 1), case.gt, case.category_ids)
        print("figures=" + json.dumps({{"oracle": oracle, "real": real}}, sort_keys=True))
        """, np=2, timeout=240, cwd=REPO)
    assert job.values("mine") == {0: "[0, 2, 4, 1]", 1: "[1, 3, 0, 1]"}
    got = {r: json.loads(v) for r, v in job.values("figures").items()}
    assert set(got) == {0, 1} and got[0] == got[1]  # every rank receives rank 0's figures
    expected = json.loads(json.dumps(_one_rank_figures(case), sort_keys=True))
    for kind in ("oracle", "real"):
        g, e = got[0][kind], expected[kind]
        assert g["images"] == e["images"] == 5
        assert g["detections"] == e["detections"]
        assert g["mAP"] == pytest.approx(e["mAP"], abs=1e-9)
        assert g["mAP50"] == pytest.approx(e["mAP50"], abs=1e-9)
        assert g["per_class_AP"] == pytest.approx(e["per_class_AP"], abs=1e-9)
    assert 0 < got[0]["oracle"]["mAP"] < 1 and got[0]["real"]["detections"] > 0
