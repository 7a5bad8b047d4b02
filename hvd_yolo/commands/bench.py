"""`hvd-yolo bench <train|allreduce|data|memory>`: each benchmark lives in `hvd_yolo.bench.<name>`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
from pathlib import Path

BENCHMARKS = {
    "train": ("hvd_yolo.bench.train", "synthetic training-step throughput (Horovod or DDP)"),
    "allreduce": ("hvd_yolo.bench.allreduce", "allreduce algorithm/bus bandwidth vs memcpy"),
    "data": ("hvd_yolo.bench.data", "shard reader vs folder-of-files images/s"),
    "memory": ("hvd_yolo.bench.memory",
               "peak memory and img/s per input size, model, batch and checkpointing"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.bench][0])
    attr = "json_path" if hasattr(args, "json_path") else "json"
    if getattr(args, attr, None) != "-":
        return int(module.run(args) or 0)
    # --json -: stdout carries the JSON only, the report goes to stderr
    with tempfile.TemporaryDirectory(prefix="hvd_yolo_bench_") as tmp:
        result = Path(tmp) / "result.json"
        setattr(args, attr, str(result))
        with contextlib.redirect_stdout(sys.stderr):
            code = int(module.run(args) or 0)
        if result.is_file():  # rank 0 wrote it
            sys.stdout.write(result.read_text())
    return code
