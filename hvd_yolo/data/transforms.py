"""Letterbox: resize keeping the aspect ratio, pad to the network's input size; boxes follow.

``letterbox`` scales an image ``[3, H, W]`` by ``scale = min(h / H, w / W)`` (up or down),
centres it on an ``h x w`` canvas filled with 114 (grey) and moves the boxes with the pixels
(``model.postprocess.unletterbox_boxes`` maps detections back to original pixels).
Resizing is torchvision's antialiased bilinear resize, on uint8 or float tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

LetterboxMeta = dict[str, Any]  # {"scale", "pad": (left, top), "orig_hw", "input_hw"}


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"letterbox size must be positive, got {size!r}")
    return h, w


def letterbox(
    image: torch.Tensor,
    boxes: torch.Tensor | None,
    size: int | tuple[int, int],
    fill: int = 114,
) -> tuple[torch.Tensor, torch.Tensor, LetterboxMeta]:
    """Letterbox ``image`` (uint8, or float in 0..1) ``[3, H, W]`` into ``size`` = ``h`` or
    ``(h, w)``.

    Returns ``(image [3, h, w] same dtype, boxes [k, 4] xyxy in input pixels, meta)`` with
    ``meta = {"scale", "pad": (left, top), "orig_hw": (H, W), "input_hw": (h, w)}``. Float
    images are padded with ``fill / 255``. ``boxes`` may be None (an empty ``[0, 4]`` returns).
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"letterbox expects an image [3, H, W], got shape {tuple(image.shape)}")
    h, w = _hw(size)
    H, W = int(image.shape[1]), int(image.shape[2])
    if H == 0 or W == 0:
        raise ValueError(f"letterbox got an empty image of size {H}x{W}")
    scale = min(h / H, w / W)
    nh, nw = min(h, max(1, round(H * scale))), min(w, max(1, round(W * scale)))
    if (nh, nw) != (H, W):
        resized = TF.resize(image, [nh, nw], antialias=True)
    else:
        resized = image
    left, top = (w - nw) // 2, (h - nh) // 2
    pad_value = fill if not image.is_floating_point() else fill / 255.0
    out = torch.full((image.shape[0], h, w), pad_value, dtype=image.dtype, device=image.device)
    out[:, top:top + nh, left:left + nw] = resized
    if boxes is None:
        boxes = torch.zeros((0, 4), dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    offset = boxes.new_tensor([left, top, left, top])
    moved = boxes * scale + offset
    meta: LetterboxMeta = {"scale": float(scale), "pad": (int(left), int(top)),
                           "orig_hw": (H, W), "input_hw": (h, w)}
    return out, moved, meta

