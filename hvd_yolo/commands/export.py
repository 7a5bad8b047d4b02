"""`hvd-yolo export`: a checkpoint as an ONNX or TorchScript file (see ``hvd_yolo.export``).

The Darknet ``.weights`` format is written by ``hvd_yolo.model.darknet_io`` and is not this
command's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvd_yolo.cli import RunError, UsageError, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint from hvd-yolo train")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                        help="onnx (onnxruntime, TensorRT...) or torchscript (torch.jit.load)")
    parser.add_argument("--out", required=True, help="the file to write")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--size", help="fixed input size S or HxW, multiples of 32 (default: "
                                      "the training size)")
    shape.add_argument("--dynamic", action="store_true",
                       help="batch, height and width free (multiples of 32)")
    parser.add_argument("--decode", action="store_true",
                        help="output boxes [B, N, 4] (input pixels) and scores [B, N, C], "
                             "not the raw maps")
    parser.add_argument("--nms", action="store_true",
                        help="also threshold and NMS in the graph (implies --decode): "
                             "detections [K, 7] = batch index, x1, y1, x2, y2, score, class")
    parser.add_argument("--conf", type=float, default=0.25, help="--nms: score threshold")
    parser.add_argument("--iou", type=float, default=0.45, help="--nms: IoU threshold")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    parser.add_argument("--json", metavar="PATH",
                        help="also write what was exported as JSON ('-': stdout only)")


def parse_size(text: str | None, default: int) -> tuple[int, int]:
    """``"416"`` or ``"384x640"`` (height x width), each a positive multiple of 32."""
    if text is None:
        return default, default
    parts = text.lower().split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or any(v < 32 or v % 32 for v in hw):
        raise UsageError(f"--size {text}: expected S or HxW, positive multiples of 32 (e.g. 416 "
                         "or 384x640)")
    return hw[0], hw[1]


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.checkpoint import CheckpointError, restore_model
    from hvd_yolo.export import export

    if not 0 <= args.conf < 1 or not 0 < args.iou <= 1:
        raise UsageError(f"--conf must be in [0, 1) and --iou in (0, 1]; got {args.conf}, {args.iou}")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; name the file to write")
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise UsageError(f"--out {out}: is the checkpoint itself")
    try:
        model, state = restore_model(args.checkpoint, use_ema=not args.no_ema)
    except (CheckpointError, OSError) as e:
        raise UsageError(str(e)) from None
    size = parse_size(args.size, int((state.get("config") or {}).get("input", {}).get("size", 416)))
    try:
        info = export(model, args.format, out, size=size, dynamic=args.dynamic,
                      decode=args.decode or args.nms, nms=args.nms, conf=args.conf, iou=args.iou)
    except OSError as e:
        raise RunError(f"--out {out}: cannot write ({e.strerror or e})") from None
    info.update(checkpoint=str(args.checkpoint), classes=list(state["class_names"]),
                model=state["model_name"])
    write_json(args.json, info)
    if args.json == "-":
        return 0
    shape = "dynamic batch, height, width" if args.dynamic else f"{size[0]}x{size[1]}"
    print(f"wrote {out} ({args.format}, {state['model_name']}, input {shape}, outputs "
          f"{', '.join(info['outputs'])}; {info['bytes'] / 1e6:.1f} MB)")
    return 0
