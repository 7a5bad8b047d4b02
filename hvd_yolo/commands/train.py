"""`hvd-yolo train`: launch with `mpirun -np N` / `horovodrun -np N`, or alone for one rank."""

from __future__ import annotations

import argparse
import json

from hvd_yolo import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with sections data/model/input/augment/optim/"
                        "dist/eval/run (see hvd_yolo/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint; auto: <out_dir>/checkpoints/last.pt "
                        "when it exists, else start fresh")
    parser.add_argument("--timeline", metavar="PATH", help="write a Horovod timeline (profiling)")


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    from hvd_yolo import dist
    from hvd_yolo.train import train

    summary = train(cfg, resume=args.resume, timeline=args.timeline)
    if dist.is_root():
        print("summary " + json.dumps(summary), flush=True)
    return 0
