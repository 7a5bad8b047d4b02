"""Training-time augmentation, deterministic per (seed, epoch, sample).

Each sample's random choices come from an RNG seeded with ``(seed, epoch, index)``, so the same
sample gets the same augmentation whichever rank or DataLoader worker loads it. That is what
makes a resumed run on the same world size follow the uninterrupted one exactly. (On another
world size the samples are dealt to ranks and batches differently: the run continues the same
schedule, not the same trajectory.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from hvd_yolo.data.transforms import letterbox


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the image left-right; boxes move with the pixels."""
    w = image.shape[-1]
    boxes = boxes.clone()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return image.flip(-1), boxes


def hsv_jitter(image: torch.Tensor, gains: tuple[float, float, float],
               rng: np.random.Generator) -> torch.Tensor:
    """Random hue shift and saturation/value scaling (YOLOv3-style colour augmentation)."""
    h, s, v = gains
    if h > 0:
        image = TF.adjust_hue(image, float(rng.uniform(-h, h)))
    if s > 0:
        image = TF.adjust_saturation(image, float(rng.uniform(1 - s, 1 + s)))
    if v > 0:
        image = TF.adjust_brightness(image, float(rng.uniform(1 - v, 1 + v)))
    return image


def mosaic(samples: list[dict[str, Any]], canvas: int,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four images letterboxed into the quadrants around a random centre of a canvas.

    Boxes are clipped to their quadrant; boxes left with under 2 pixels of width or height
    are dropped.
    """
    out = torch.full((3, canvas, canvas), 114, dtype=torch.uint8)
    cx = int(rng.uniform(0.3, 0.7) * canvas)
    cy = int(rng.uniform(0.3, 0.7) * canvas)
    cells = [(0, 0, cx, cy), (cx, 0, canvas, cy), (0, cy, cx, canvas), (cx, cy, canvas, canvas)]
    all_boxes, all_cls = [], []
    for s, (x0, y0, x1, y1) in zip(samples, cells):
        img, boxes, _ = letterbox(s["image"], s["boxes"], (y1 - y0, x1 - x0))
        out[:, y0:y1, x0:x1] = img
        boxes = boxes + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(x0, x1)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(y0, y1)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 2) & ((boxes[:, 3] - boxes[:, 1]) >= 2)
        all_boxes.append(boxes[keep])
        all_cls.append(s["classes"][keep])
    return out, torch.cat(all_boxes), torch.cat(all_cls)


class AugmentedDataset(Dataset):
    """Wraps a ``ShardDataset``: index with ``(epoch, i)``; returns an augmented, letterboxed
    sample at ``canvas`` x ``canvas`` pixels (uint8), its boxes and classes."""

    def __init__(self, base: Dataset, canvas: int, seed: int = 0, flip: float = 0.5,
                 hsv: tuple[float, float, float] = (0.015, 0.7, 0.4), mosaic: float = 0.0,
                 train: bool = True) -> None:
        self.base, self.canvas, self.seed = base, canvas, seed
        self.flip, self.hsv, self.mosaic, self.train = flip, tuple(hsv), mosaic, train

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        sample = self.base[index]
        corrupt = len(sample.get("corrupt", ()))  # corrupt samples the reader replaced
        if not self.train:
            image, boxes, meta = letterbox(sample["image"], sample["boxes"], self.canvas)
            meta.update(image_id=sample["image_id"], corrupt=corrupt)
            return {"image": image, "boxes": boxes, "classes": sample["classes"], "meta": meta}
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.mosaic > 0 and rng.random() < self.mosaic:
            others = [self.base[int(j)] for j in rng.integers(0, len(self.base), 3)]
            corrupt += sum(len(o.get("corrupt", ())) for o in others)
            image, boxes, classes = mosaic([sample, *others], self.canvas, rng)
        else:
            image, boxes, _ = letterbox(sample["image"], sample["boxes"], self.canvas)
            classes = sample["classes"]
        if rng.random() < self.flip:
            image, boxes = hflip(image, boxes)
        image = hsv_jitter(image, self.hsv, rng)
        return {"image": image, "boxes": boxes, "classes": classes,
                "meta": {"image_id": sample["image_id"], "index": index, "corrupt": corrupt}}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (uint8 [B,3,S,S]) and build targets [N,6] = (batch index, class, xyxy)."""
    images = torch.stack([s["image"] for s in samples])
    targets = [
        torch.cat([torch.full((len(s["boxes"]), 1), float(i)),
                   s["classes"].to(torch.float32).view(-1, 1), s["boxes"].to(torch.float32)], 1)
        for i, s in enumerate(samples)
    ]
    return {"images": images, "targets": torch.cat(targets) if targets else torch.zeros(0, 6),
            "metas": [s["meta"] for s in samples]}
