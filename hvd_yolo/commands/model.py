"""`hvd-yolo model info`: parameter count, Darknet file size, output shapes and GFLOPs.

``hvd-yolo model info --model yolov3 --classes 80 --size 416`` (``--size 384x640`` for a
non-square input); ``--weights FILE [--backbone]`` also loads a Darknet ``.weights`` file and
reports its header; ``--json PATH`` also writes the figures as JSON (``-``: stdout only).
"""

from __future__ import annotations

import argparse
from typing import Any

from hvd_yolo.cli import RunError, UsageError, write_json
from hvd_yolo.model.yolov3 import MODEL_NAMES, YOLOv3, build_model, count_parameters


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size must be N or HxW (e.g. 416 or 384x640), got "
                                         f"{text!r}")
    return parts[0], parts[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="parameter count, output shapes, GFLOPs",
                          description="parameter count, output shapes, GFLOPs")
    info.add_argument("--model", choices=MODEL_NAMES, default="yolov3")
    info.add_argument("--classes", type=int, default=80, help="number of classes (default 80)")
    info.add_argument("--size", type=_size, default=(416, 416),
                      help="input size N or HxW, multiples of 32 (default 416)")
    info.add_argument("--weights", default=None,
                      help="also load this Darknet .weights file (checks it fits the model)")
    info.add_argument("--backbone", action="store_true",
                      help="--weights is a backbone-only file (darknet53.conv.74, "
                           "yolov3-tiny.conv.15)")
    info.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout only)")


def model_info(model: YOLOv3, height: int, width: int) -> dict[str, Any]:
    """The figures ``model info`` prints (ValueError for a size not divisible by 32)."""
    from hvd_yolo.model.darknet_io import darknet_float_count

    shapes = model.output_shapes(height, width)
    floats = darknet_float_count(model)
    return {
        "model": model.name,
        "classes": model.num_classes,
        "input_hw": [height, width],
        "parameters": count_parameters(model),
        "darknet_floats": floats,
        "darknet_bytes": floats * 4 + 20,
        "backbone_floats": darknet_float_count(model, model.backbone_cutoff),
        "outputs": [{"stride": s, "shape": list(shape), "anchors": [list(p) for p in model.anchors[i]]}
                    for i, (s, shape) in enumerate(zip(model.strides, shapes))],
        "gflops": model.flops(height, width) / 1e9,
    }


def run(args: argparse.Namespace) -> int:
    try:
        model = build_model(args.model, args.classes)
        info = model_info(model, *args.size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.weights:
        from hvd_yolo.model.darknet_io import load_darknet_weights

        try:
            header = load_darknet_weights(model, args.weights, backbone=args.backbone)
        except (OSError, ValueError) as exc:
            raise RunError(str(exc)) from None
        info["weights"] = {"path": str(args.weights), "backbone": bool(args.backbone),
                           "version": [header.major, header.minor, header.revision],
                           "seen": header.seen}
    write_json(args.json, info)
    if args.json == "-":
        return 0
    h, w = info["input_hw"]
    print(f"model:       {info['model']} ({info['classes']} classes)")
    print(f"parameters:  {info['parameters']:,}")
    print(f"darknet:     {info['darknet_floats']:,} floats in a .weights file "
          f"({info['darknet_bytes']:,} bytes; parameters + BN running mean/var), backbone "
          f"file {info['backbone_floats']:,} floats")
    print(f"input:       {h}x{w}")
    for i, out in enumerate(info["outputs"]):
        anchors = " ".join(f"{a:g}x{b:g}" for a, b in out["anchors"])
        print(f"output {i}:    stride {out['stride']:>2}  shape {out['shape']}  anchors {anchors}")
    print(f"GFLOPs:      {info['gflops']:.2f} per image at {h}x{w} (convolutions, 2 x MACs)")
    if "weights" in info:
        wt = info["weights"]
        print(f"weights:     {wt['path']} loaded (version {'.'.join(map(str, wt['version']))}, "
              f"{wt['seen']:,} images seen{', backbone only' if wt['backbone'] else ''})")
    return 0
