"""`hvd-yolo train`: launch with `mpirun -np N` / `horovodrun -np N`, or alone for one rank
(``hvd_yolo.loop.fixed``), or with `horovodrun --min-np/--max-np` (``hvd_yolo.loop.elastic``)."""

from __future__ import annotations

import argparse
import json
import os

from hvd_yolo import config
from hvd_yolo.cli import RunError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with sections data, model, "
                        "input, augment, optim, dist, eval, run (--print-config shows them all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint; auto: <out_dir>/checkpoints/last.pt "
                        "(the newest step file that verifies when last.pt is corrupted), or "
                        "start fresh when there is none")
    parser.add_argument("--fresh", action="store_true",
                        help="start over in a run.out_dir that holds an earlier run's "
                        "checkpoints (they and its logs are deleted); without it such a "
                        "folder is refused")
    parser.add_argument("--print-config", action="store_true",
                        help="print the full configuration (defaults, then --config and --set) "
                        "as YAML with each setting's meaning, and exit")
    parser.add_argument("--timeline", metavar="PATH", help="write a Horovod timeline (profiling)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that has no hvd-yolo checksum record (still read "
                        "as tensors and plain values only, never code)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config, args.overrides, check=not args.print_config)
    except (config.ConfigError, FileNotFoundError) as e:  # every rank finds it; rank 0 says it
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "0"))
        raise UsageError(str(e), show=rank == "0") from None
    if args.print_config:  # a starting point for --config: every key, its value and meaning
        print(config.to_commented_yaml(cfg), end="")
        return 0
    from hvd_yolo.checkpoint import CheckpointError, trust_unsealed
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.loop.step import NonFiniteLoss
    from hvd_yolo.runlock import OutDirError, expect_start
    from hvd_yolo.shards.format import ShardError, error_text

    trust_unsealed(args.trust_checkpoint)
    if args.fresh and args.resume:
        raise UsageError("--fresh starts over, --resume continues: give one of them")
    expect_start(args.resume, args.fresh)  # checked by rank 0 under the out_dir lock
    if dist.elastic_launch():  # horovodrun --min-np/--max-np: the loop survives lost/new workers
        from hvd_yolo.loop.elastic import train
    else:
        from hvd_yolo.loop.fixed import train
    try:
        summary = train(cfg, resume=args.resume, timeline=args.timeline)
    except ShardError as e:  # corrupt or missing data: named, no traceback; mpirun ends the others
        raise RunError(f"rank {dist.rank()}: {error_text(e)}") from None
    except config.ConfigError as e:  # the data does not fit the config: found before any step
        raise UsageError(str(e), show=dist.is_root()) from None
    except (CheckpointError, OutDirError, NonFiniteLoss) as e:  # decided together, raised on every rank
        raise RunError(str(e), show=dist.is_root()) from None
    if dist.is_root():
        print("summary " + json.dumps(summary), flush=True)
        from hvd_yolo.progress import wrote_line  # the last line: what the run wrote, where

        print(wrote_line(summary["out_dir"], ("checkpoints/last.pt", "checkpoints/best.pt",
                                              "metrics.jsonl", "results.png", "plots",
                                              "tensorboard")), flush=True)
    return 0
