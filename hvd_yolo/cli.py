"""`hvd-yolo` command line: one sub-command per module under `hvd_yolo.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``hvd-yolo env`` works even when a heavy dependency
is broken (which is exactly when a user needs it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("hvd_yolo.commands.env", "print versions and what Horovod was built with"),
    "convert": ("hvd_yolo.commands.convert", "convert YOLO txt / COCO json / VOC xml to shards"),
    "shards": ("hvd_yolo.commands.shards", "verify or describe a shard directory"),
    "model": ("hvd_yolo.commands.model", "model information (parameter counts, shapes)"),
    "train": ("hvd_yolo.commands.train", "train under mpirun/horovodrun (or one process)"),
    "eval": ("hvd_yolo.commands.eval", "distributed COCO-mAP evaluation of a checkpoint"),
    "detect": ("hvd_yolo.commands.detect", "run a checkpoint on images or shards"),
    "bench": ("hvd_yolo.commands.bench", "benchmarks: train, allreduce, data"),
    "demo": ("hvd_yolo.commands.demo", "end-to-end demo on a built-in synthetic dataset"),
    "cluster": ("hvd_yolo.commands.cluster", "a simulated multi-node cluster on this machine"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only ``command``'s module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="hvd-yolo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
