"""Decode the raw YOLO maps, threshold, class-aware NMS (``torchvision.ops.batched_nms``).

``postprocess(outputs, model)`` returns, per image, ``[k, 6]`` rows ``(x1, y1, x2, y2, score,
class)`` in input (letterboxed) pixels, best score first; ``to_original`` maps them back to
the original image with the letterbox meta.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import batched_nms

from hvd_yolo.model.yolov3 import box_from_raw


def decode(outputs: list[torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """All predictions of a batch: boxes ``[B, N, 4]`` xyxy input pixels and probabilities
    ``[B, N, 1 + C]`` (objectness, then classes), N summed over scales, anchors and cells."""
    boxes, probs = [], []
    for p, stride, anchors in zip(outputs, model.strides, model.anchors):
        p = p.float()  # decode in fp32 (exp overflows fp16 under AMP)
        b, a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device),
                                torch.arange(w, device=p.device), indexing="ij")
        cell = torch.stack((gx, gy), -1).to(p.dtype)  # [h, w, 2]
        anchor_wh = torch.as_tensor(anchors, device=p.device, dtype=p.dtype).view(1, a, 1, 1, 2)
        box = box_from_raw(p[..., 0:2], p[..., 2:4], cell, anchor_wh, float(stride))
        boxes.append(box.reshape(b, -1, 4))
        probs.append(p[..., 4:].sigmoid().reshape(b, a * h * w, -1))
    return torch.cat(boxes, 1), torch.cat(probs, 1)


@torch.no_grad()
def postprocess(
    outputs: list[torch.Tensor],
    model: nn.Module,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    *,
    multi_label: bool = False,
    agnostic: bool = False,
    max_candidates: int = 30000,
) -> list[torch.Tensor]:
    """Detections per image: ``[k, 6]`` = ``(x1, y1, x2, y2, score, class)`` in input pixels.

    ``score = objectness * class probability``; a box keeps its best class (every class above
    ``conf_thres`` with ``multi_label``). Boxes are clipped to the input, the
    ``max_candidates`` best go through class-aware NMS (class-agnostic with ``agnostic``), and
    at most ``max_det`` are kept.
    """
    if not 0 <= conf_thres < 1 or not 0 < iou_thres <= 1 or max_det < 1:
        raise ValueError(f"need 0 <= conf_thres < 1, 0 < iou_thres <= 1, max_det >= 1; got "
                         f"{conf_thres}, {iou_thres}, {max_det}")
    boxes, probs = decode(outputs, model)
    in_h = outputs[0].shape[2] * model.strides[0]
    in_w = outputs[0].shape[3] * model.strides[0]
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, in_w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, in_h)
    obj = probs[..., :1]
    cls_scores = obj * probs[..., 1:] if probs.shape[-1] > 1 else obj
    results = []
    for bx, obj_i, sc in zip(boxes, obj[..., 0], cls_scores):
        keep = obj_i > conf_thres  # cheap pre-filter: score <= objectness
        bx, sc = bx[keep], sc[keep]
        if multi_label:
            i, j = (sc > conf_thres).nonzero(as_tuple=True)
            bx, score, cls = bx[i], sc[i, j], j
        else:
            score, cls = sc.max(1)
            m = score > conf_thres
            bx, score, cls = bx[m], score[m], cls[m]
        if score.numel() > max_candidates:
            top = score.topk(max_candidates).indices
            bx, score, cls = bx[top], score[top], cls[top]
        keep = batched_nms(bx.float(), score.float(), cls if not agnostic else cls * 0,
                           iou_thres)[:max_det]
        results.append(torch.cat((bx[keep], score[keep, None], cls[keep, None].to(bx.dtype)), 1)
                       .float())
    return results


def unletterbox_boxes(boxes: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Map boxes ``[k, 4+]`` (xyxy first, any extra columns kept) from the letterboxed input
    back to the original image's pixels, clipped to it. Returns a new float tensor."""
    boxes = torch.as_tensor(boxes)
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise ValueError(f"boxes must be [k, 4+] xyxy, got shape {tuple(boxes.shape)}")
    out = boxes.clone() if boxes.is_floating_point() else boxes.float()
    left, top = meta["pad"]
    H, W = meta["orig_hw"]
    scale = float(meta["scale"])
    xyxy = (out[:, :4] - out.new_tensor([left, top, left, top])) / scale
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, W)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, H)
    out[:, :4] = xyxy
    return out


def to_original(detections: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Map one image's detections ``[k, 6]`` from input to original pixels (clipped)."""
    return unletterbox_boxes(detections, meta)
