"""`hvd-yolo train`: launch with `mpirun -np N` / `horovodrun -np N`, or alone for one rank."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hvd_yolo import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with sections data/model/input/augment/optim/"
                        "dist/eval/run (see hvd_yolo/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint; auto: <out_dir>/checkpoints/last.pt "
                        "(the newest step file that verifies when last.pt is corrupted), or "
                        "start fresh when there is none")
    parser.add_argument("--timeline", metavar="PATH", help="write a Horovod timeline (profiling)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config, args.overrides)
    except (config.ConfigError, FileNotFoundError) as e:
        if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "0")) == "0":
            print(f"hvd-yolo train: error: {e}", file=sys.stderr)  # argparse style, exit 2
        return 2
    from hvd_yolo import dist
    from hvd_yolo.checkpoint import CheckpointError
    from hvd_yolo.data.shards import ShardError, error_text
    from hvd_yolo.runlock import OutDirError
    from hvd_yolo.train import NonFiniteLoss, train

    try:
        summary = train(cfg, resume=args.resume, timeline=args.timeline)
    except ShardError as e:  # corrupt or missing data: named, no traceback; mpirun ends the others
        print(f"hvd-yolo train: error: rank {dist.rank()}: {error_text(e)}", file=sys.stderr,
              flush=True)
        return 1
    except config.ConfigError as e:  # the data does not fit the config: found before any step
        if dist.is_root():
            print(f"hvd-yolo train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, OutDirError, NonFiniteLoss) as e:  # decided together, raised on every rank
        if dist.is_root():
            print(f"hvd-yolo train: error: {e}", file=sys.stderr, flush=True)
        return 1
    if dist.is_root():
        print("summary " + json.dumps(summary), flush=True)
    return 0
