"""`hvd-yolo eval`: distributed COCO-mAP of a checkpoint on a shard directory.

Run under ``mpirun -np N`` (each rank evaluates its share; rank 0 scores) or alone.
"""

from __future__ import annotations

import argparse

from hvd_yolo import config
from hvd_yolo.cli import RunError, UsageError, write_json
from hvd_yolo.commands.model import add_pair_arguments, open_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a checkpoint from hvd-yolo train or model import")
    add_pair_arguments(parser)  # --cfg/--weights/--names: a Darknet pair instead
    parser.add_argument("--data", required=True, help="shard directory to evaluate on")
    parser.add_argument("--size", type=int, help="input size (default: the training size)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per rank per step")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout only)")
    parser.add_argument("--results", help="write the COCO results json (detections) here")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that has no hvd-yolo checksum record (still read "
                        "as tensors and plain values only, never code)")
    parser.add_argument("--plots", metavar="DIR", help="write the PR and F1 curves, the confusion "
                        "matrix (PNG + CSV) and a grid of images with detections into DIR")
    parser.add_argument("--plots-conf", type=float, default=0.25, metavar="C",
                        help="confidence threshold of the confusion matrix and the image grid "
                             "(default 0.25)")
    parser.add_argument("--plots-iou", type=float, default=0.45, metavar="T",
                        help="IoU a detection needs to match a box in the confusion matrix "
                             "(default 0.45)")


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.checkpoint import CheckpointError
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.data.dataset import ShardDataset
    from hvd_yolo.evaluate import evaluate, make_eval_loader
    from hvd_yolo.shards.format import ShardError, error_text

    ctx = dist.init()
    # Every rank reads the same inputs, so every rank finds a mistake; rank 0 says it.
    try:
        model, state = open_model(args, use_ema=not args.no_ema, show=ctx.is_root)
        cfg = config.from_dict(state["config"])
        cfg.input.size = args.size or cfg.input.size
        cfg.eval.batch_size = args.batch_size
        cfg.validate()
        ds = ShardDataset(args.data)
    except (CheckpointError, ShardError, config.ConfigError) as e:
        raise UsageError(str(e), show=ctx.is_root) from None
    if list(ds.class_names) != list(state["class_names"]):
        raise UsageError(f"{args.data}: classes {ds.class_names} differ from the checkpoint's "
                         f"{state['class_names']}", show=ctx.is_root)
    plots = plot_request(args, ctx.is_root)
    try:
        figures = evaluate(model.to(ctx.device), make_eval_loader(ds, cfg, ctx), ds, cfg,
                           ctx.device, results_path=args.results, plots_dir=plots,
                           progress=True)
    except ShardError as e:  # a corrupt image: named, no traceback; mpirun ends the other ranks
        raise RunError(f"rank {ctx.rank}: {error_text(e)} (an evaluation scores every image: "
                       f"`hvd-yolo shards verify {args.data}` lists the damage; convert the set "
                       "again)") from None
    if ctx.is_root and args.json == "-":
        write_json("-", figures)
    elif ctx.is_root:
        print(f"images {figures['images']}  mAP@0.5:0.95 {figures['mAP']:.4f}  "
              f"mAP@0.5 {figures['mAP50']:.4f}")
        for name, ap in (figures.get("per_class_AP") or {}).items():
            print(f"  AP {name}: {ap:.4f}")
        write_json(args.json, figures)
        if args.results:
            print(f"detections (COCO results json): {args.results}")
        if figures.get("plots"):
            print(f"figures: {', '.join(figures['plots'])}")
    if figures.get("plots_error"):
        raise RunError(f"--plots {figures['plots_error']}", show=ctx.is_root)
    return 0


def plot_request(args: argparse.Namespace, show: bool):
    """``--plots DIR`` and its thresholds, checked before any image is read (None: no plots)."""
    if not args.plots:
        return None
    from pathlib import Path

    from hvd_yolo.plots import PlotRequest

    if not 0 <= args.plots_conf < 1 or not 0 < args.plots_iou <= 1:
        raise UsageError(f"--plots-conf must be in [0, 1) and --plots-iou in (0, 1]; got "
                         f"{args.plots_conf} and {args.plots_iou}", show=show)
    out = Path(args.plots)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--plots {out}: exists and is not a folder", show=show)
    return PlotRequest(out, conf=args.plots_conf, iou=args.plots_iou)
