"""`hvd-yolo shards verify DIR` and `hvd-yolo shards info DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hvd_yolo.cli import RunError, UsageError, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="checksums (sha256, per-image CRC32), decodes, boxes and "
                       "counts; exit 1 at the first bad shard/sample")
    v.add_argument("dir", help="shard directory (with manifest.json)")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    i = sub.add_parser("info", help="counts, classes, boxes per class, size histograms")
    i.add_argument("dir", help="shard directory (with manifest.json)")
    i.add_argument("--json", metavar="PATH", help="also write the numbers as JSON ('-': stdout only)")


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.shards.format import ShardError
    from hvd_yolo.shards.info import format_info, shard_info
    from hvd_yolo.shards.verify import verify_shards

    if not Path(args.dir).is_dir():
        raise UsageError(f"{args.dir}: no such directory")
    try:
        if args.action == "verify":
            bar = None
            if sys.stderr.isatty() and not args.no_decode:
                from tqdm import tqdm

                bar = tqdm(desc="verify", unit="img")
            try:
                res = verify_shards(args.dir, decode=not args.no_decode,
                                    progress=bar.update if bar else None)
            finally:
                if bar is not None:
                    bar.close()
            checks = "sha256, boxes, counts" + ("" if args.no_decode else
                                                ", every image's CRC32 and decode")
            print(f"OK {args.dir}: {res.shards} shards, {res.images} images, {res.boxes} boxes "
                  f"({checks})")
            return 0
        info = shard_info(args.dir)
        if args.json != "-":
            print(format_info(info))
        write_json(args.json, info)
        return 0
    except ShardError as e:
        raise RunError(str(e)) from None
