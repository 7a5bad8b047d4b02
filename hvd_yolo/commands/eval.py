"""`hvd-yolo eval`: distributed COCO-mAP of a checkpoint on a shard directory.

Run under ``mpirun -np N`` (each rank evaluates its share; rank 0 scores) or alone.
"""

from __future__ import annotations

import argparse

from hvd_yolo import config
from hvd_yolo.cli import RunError, UsageError, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint from hvd-yolo train")
    parser.add_argument("--data", required=True, help="shard directory to evaluate on")
    parser.add_argument("--size", type=int, help="input size (default: the training size)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per rank per step")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout only)")
    parser.add_argument("--results", help="write the COCO results json (detections) here")


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.checkpoint import CheckpointError, restore_model
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.data.dataset import ShardDataset
    from hvd_yolo.evaluate import evaluate, make_eval_loader
    from hvd_yolo.shards.format import ShardError, error_text

    ctx = dist.init()
    # Every rank reads the same inputs, so every rank finds a mistake; rank 0 says it.
    try:
        model, state = restore_model(args.checkpoint, use_ema=not args.no_ema)
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
    try:
        figures = evaluate(model.to(ctx.device), make_eval_loader(ds, cfg, ctx), ds, cfg,
                           ctx.device, results_path=args.results)
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
    return 0
