"""Export a trained model to ONNX or TorchScript, with or without decoding and NMS.

The exported graph takes float images ``[B, 3, H, W]`` RGB in 0..1, letterboxed to a multiple
of 32 (``hvd_yolo.data.transforms.letterbox``), and returns:

- raw (default): one map per scale, large stride first, ``[B, A, H/s, W/s, 5 + C]`` logits,
  as ``YOLOv3.forward`` (``model.postprocess`` decodes them);
- ``decode``: ``boxes [B, N, 4]`` xyxy input pixels (clipped to the input) and ``scores
  [B, N, C]`` = objectness x class probability;
- ``decode`` + ``nms``: ``detections [K, 7]`` = ``(image index in the batch, x1, y1, x2, y2,
  score, class)``, each box's best class above ``conf``, class-aware NMS at ``iou`` per image,
  best score first: the detections of ``model.postprocess`` (without its ``max_det`` cut).

``size`` fixes the input; ``dynamic`` lets batch, height and width vary (ONNX dynamic axes;
TorchScript traced with shape arithmetic kept).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import batched_nms

from hvd_yolo.model.postprocess import decode as decode_maps

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


class ExportModel(nn.Module):
    """``model`` with the chosen output: raw maps, decoded boxes and scores, or detections."""

    def __init__(self, model: nn.Module, decode: bool = False, nms: bool = False,
                 conf: float = 0.25, iou: float = 0.45) -> None:
        super().__init__()
        if nms and not decode:
            raise ValueError("NMS needs the decoding: export with decode as well")
        self.model, self.decode, self.nms, self.conf, self.iou = model.eval(), decode, nms, conf, iou
        self.strides = list(model.strides)
        self.register_buffer("anchors", model.anchor_wh.detach().clone(), persistent=False)

    def output_names(self) -> list[str]:
        if self.nms:
            return ["detections"]
        if self.decode:
            return ["boxes", "scores"]
        return [f"raw_stride{s}" for s in self.strides]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        if not self.decode:
            return tuple(outputs)
        boxes, probs = decode_maps(outputs, self)
        h, w = images.shape[2], images.shape[3]
        x = boxes[..., 0::2].clamp(min=0).minimum(torch.full_like(boxes[..., 0::2], 1) * w)
        y = boxes[..., 1::2].clamp(min=0).minimum(torch.full_like(boxes[..., 1::2], 1) * h)
        boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), -1)
        scores = probs[..., :1] * probs[..., 1:]
        if not self.nms:
            return boxes, scores
        best, cls = scores.max(-1)  # [B, N]
        batch = torch.arange(best.shape[0], device=best.device).unsqueeze(1).expand_as(best)
        keep = best > self.conf
        bx, sc, cl, bi = boxes[keep], best[keep], cls[keep], batch[keep]
        # one NMS call over every image and class: the group is (image, class)
        kept = batched_nms(bx, sc, bi * scores.shape[-1] + cl, self.iou)
        return (torch.cat((bi[kept, None].to(bx.dtype), bx[kept], sc[kept, None],
                           cl[kept, None].to(bx.dtype)), 1),)


def export(model: nn.Module, fmt: str, out: str | Path, size: tuple[int, int] = (416, 416),
           dynamic: bool = False, decode: bool = False, nms: bool = False,
           conf: float = 0.25, iou: float = 0.45) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` to ``out``; returns what was written (inputs, outputs)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    wrapper = ExportModel(model.cpu().float(), decode, nms, conf, iou).eval()
    example = torch.rand(1 if not dynamic else 2, 3, *size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        if fmt == "onnx":
            _onnx(wrapper, example, tmp, dynamic)
        else:
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(tmp))
    tmp.replace(out)
    return {"path": str(out), "format": fmt, "input": "images [B, 3, H, W] float RGB 0..1",
            "size": "dynamic" if dynamic else list(size), "outputs": wrapper.output_names(),
            "decode": decode, "nms": nms, "conf": conf if nms else None,
            "iou": iou if nms else None, "bytes": out.stat().st_size}


def _onnx(wrapper: ExportModel, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    names = wrapper.output_names()
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        if wrapper.nms:
            axes["detections"] = {0: "detections"}
        elif wrapper.decode:
            axes.update(boxes={0: "batch", 1: "boxes"}, scores={0: "batch", 1: "boxes"})
        else:
            axes.update({n: {0: "batch", 2: f"h{n[10:]}", 3: f"w{n[10:]}"} for n in names})
    torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                      output_names=names, dynamic_axes=axes, opset_version=ONNX_OPSET,
                      dynamo=False)
