"""`hvd-yolo bench <train|allreduce|data>`: each benchmark lives in `hvd_yolo.bench.<name>`."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "train": ("hvd_yolo.bench.train", "synthetic training-step throughput (Horovod or DDP)"),
    "allreduce": ("hvd_yolo.bench.allreduce", "allreduce algorithm/bus bandwidth vs memcpy"),
    "data": ("hvd_yolo.bench.data", "shard reader vs folder-of-files images/s"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.bench][0]).run(args) or 0)
