"""`hvd-yolo model info|import|export`: figures of a model, and Darknet files in and out.

``hvd-yolo model info --model yolov3 --classes 80 --size 416`` (``--size 384x640`` for a
non-square input); ``--weights FILE [--backbone]`` also loads a Darknet ``.weights`` file and
reports its header; ``--json PATH`` also writes the figures as JSON (``-``: stdout only).

``hvd-yolo model import --cfg X.cfg --weights X.weights --out model.pt [--names X.names]``: a
Darknet pair as a checkpoint that ``detect`` and ``eval`` take (the cfg must be the yolov3 or
yolov3-tiny layout, any class count and anchors). ``hvd-yolo model export --checkpoint C.pt
--out NAME.weights``: the weights, with ``NAME.cfg`` and ``NAME.names`` beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hvd_yolo.cli import RunError, UsageError, write_json
from hvd_yolo.config import MODEL_NAMES
from hvd_yolo.model.yolov3 import YOLOv3, build_model, count_parameters


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
    imp = sub.add_parser("import", help="a Darknet .cfg + .weights pair as a checkpoint",
                         description="a Darknet .cfg + .weights pair (yolov3 or yolov3-tiny "
                         "layout, any class count) as a checkpoint for detect and eval")
    imp.add_argument("--cfg", required=True, help="Darknet .cfg")
    imp.add_argument("--weights", required=True, help="Darknet .weights (the full model)")
    imp.add_argument("--names", help="class names, one per line (default: <cfg>.names beside "
                     "the cfg, else Darknet's COCO names for 80 classes)")
    imp.add_argument("--out", required=True, help="checkpoint to write (a new file)")
    exp = sub.add_parser("export", help="a checkpoint as Darknet .weights + .cfg + .names",
                         description="a checkpoint as Darknet .weights, with the .cfg and "
                         ".names beside it")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint from train or import")
    exp.add_argument("--out", required=True, help="NAME.weights to write (NAME.cfg and "
                     "NAME.names beside it; all new files)")
    exp.add_argument("--size", type=int, help="width=height in the cfg (default: the training "
                     "size)")
    exp.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA")


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
    if args.model_command == "import":
        return import_pair(args)
    if args.model_command == "export":
        return export_checkpoint(args)
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


def _new_files(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            raise UsageError(f"{p} exists: choose a new file (nothing was written)")


def import_pair(args: argparse.Namespace) -> int:
    """``model import``: the pair checked, loaded and written as a sealed checkpoint."""
    from hvd_yolo.checkpoint import atomic_save
    from hvd_yolo.model.darknet_cfg import CfgError
    from hvd_yolo.model.darknet_pair import load_darknet_model

    out = Path(args.out)
    _new_files(out)
    try:
        model, state = load_darknet_model(args.cfg, args.weights, args.names)
    except CfgError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{args.weights}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"{e} (the .weights must hold the whole network the cfg describes)") \
            from None
    atomic_save(state, out)
    dk = state["darknet"]
    print(f"{out}: {state['model_name']}, {len(state['class_names'])} classes (names: "
          f"{dk['names']}), input {dk['width']}x{dk['height']}, {count_parameters(model):,} "
          f"parameters, {dk['seen']:,} images seen")
    for i, scale in enumerate(model.anchors):
        print(f"  output {i}: stride {model.strides[i]:>2}  anchors "
              + " ".join(f"{w:g}x{h:g}" for w, h in scale))
    return 0


def export_checkpoint(args: argparse.Namespace) -> int:
    """``model export``: NAME.weights, NAME.cfg and NAME.names from a checkpoint."""
    from hvd_yolo.checkpoint import CheckpointError, restore_model
    from hvd_yolo.model.darknet_cfg import cfg_text
    from hvd_yolo.model.darknet_io import save_darknet_weights

    weights = Path(args.out)
    if weights.suffix != ".weights":
        raise UsageError(f"--out {weights}: name it NAME.weights (NAME.cfg and NAME.names are "
                         "written beside it)")
    cfg_path, names_path = weights.with_suffix(".cfg"), weights.with_suffix(".names")
    _new_files(weights, cfg_path, names_path)
    try:
        model, state = restore_model(args.checkpoint, use_ema=not args.no_ema)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    size = args.size or int(state["config"]["input"]["size"])
    if size <= 0 or size % 32:
        raise UsageError(f"--size {size}: must be a positive multiple of 32")
    weights.parent.mkdir(parents=True, exist_ok=True)
    floats = save_darknet_weights(model, weights, seen=int(state.get("darknet", {}).get("seen", 0)))
    cfg_path.write_text(cfg_text(model, size))
    names_path.write_text("".join(f"{n}\n" for n in state["class_names"]))
    print(f"{weights}: {floats:,} floats ({model.name}, {model.num_classes} classes); "
          f"{cfg_path} ({size}x{size}); {names_path}")
    return 0


def open_model(args: argparse.Namespace, use_ema: bool = True, show: bool = True
               ) -> tuple[Any, dict[str, Any]]:
    """The model of ``--checkpoint``, or of ``--cfg``/``--weights`` (detect, eval): ``(model in
    eval mode on the CPU, checkpoint dict)``; UsageError for a wrong combination or a bad pair."""
    from hvd_yolo.checkpoint import restore_model
    from hvd_yolo.model.darknet_cfg import CfgError
    from hvd_yolo.model.darknet_pair import load_darknet_model

    pair = getattr(args, "cfg", None) or getattr(args, "weights", None)
    if bool(args.checkpoint) == bool(pair):
        raise UsageError("give --checkpoint, or --cfg and --weights (a Darknet pair)", show=show)
    if args.checkpoint:
        return restore_model(args.checkpoint, use_ema=use_ema,
                             trust=getattr(args, "trust_checkpoint", False))
    if not (args.cfg and args.weights):
        raise UsageError("--cfg and --weights go together (a Darknet .cfg and its .weights)",
                         show=show)
    try:
        return load_darknet_model(args.cfg, args.weights, getattr(args, "names", None))
    except CfgError as e:
        raise UsageError(str(e), show=show) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--weights {args.weights}: {getattr(e, 'strerror', None) or e}",
                         show=show) from None


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg``/``--weights``/``--names`` for detect and eval (instead of ``--checkpoint``)."""
    parser.add_argument("--cfg", help="a Darknet .cfg (with --weights, instead of --checkpoint)")
    parser.add_argument("--weights", help="the Darknet .weights of --cfg")
    parser.add_argument("--names", help="class names of --cfg, one per line (default: <cfg>.names "
                        "beside the cfg, else COCO's for 80 classes)")
