"""`hvd-yolo` command line: one sub-command per module under `hvd_yolo.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``hvd-yolo env`` works even when a heavy dependency
is broken (which is exactly when a user needs it).

Every command reports a mistake the same way, argparse style: one line
``hvd-yolo CMD: error: ...`` on stderr, exit 2 for a usage or configuration mistake and exit 1
for a run that failed, no traceback. Commands raise :class:`UsageError` / :class:`RunError`;
:func:`main` prints them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from hvd_yolo import __version__

DESCRIPTION = """Train YOLOv3 on many processes with Horovod: convert a dataset to HDF5 shards,
train under mpirun/horovodrun, evaluate, detect, benchmark."""

EPILOG = """typical workflow:
  hvd-yolo env                                   check the stack on each node
  hvd-yolo convert yolo data/mine shards/mine     dataset -> shards (mpirun for many ranks)
  hvd-yolo train --print-config > cfg.yaml        every setting, with its meaning
  mpirun -np 4 hvd-yolo train --config cfg.yaml   train (or mpi/mpirun.sh, horovodrun)
  mpirun -np 4 hvd-yolo eval --checkpoint run/checkpoints/best.pt --data shards/val
  hvd-yolo detect --checkpoint best.pt photos/ --out detections.json --draw drawn/
  hvd-yolo demo                                   all of the above on a synthetic dataset

'hvd-yolo COMMAND --help' describes a command's options."""

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("hvd_yolo.commands.env",
            "print the versions of the stack and what Horovod was built with; run it first"),
    "convert": ("hvd_yolo.commands.convert",
                "convert a YOLO txt / COCO json / Pascal VOC xml dataset to HDF5 shards"),
    "shards": ("hvd_yolo.commands.shards", "verify a shard directory, or count what it holds"),
    "model": ("hvd_yolo.commands.model", "a model's parameters, output shapes and GFLOPs"),
    "train": ("hvd_yolo.commands.train",
              "train on shards under mpirun/horovodrun (or in one process); resumable"),
    "eval": ("hvd_yolo.commands.eval", "COCO mAP of a checkpoint on a shard directory"),
    "detect": ("hvd_yolo.commands.detect",
               "find objects in images, folders or shards with a checkpoint"),
    "bench": ("hvd_yolo.commands.bench",
              "measure training, allreduce and data-reading speed"),
    "demo": ("hvd_yolo.commands.demo",
             "convert, train and evaluate on a built-in synthetic dataset in minutes"),
    "cluster": ("hvd_yolo.commands.cluster",
                "a simulated multi-node cluster on this machine, to rehearse a launch"),
    "plan": ("hvd_yolo.commands.plan",
             "measure the cluster (under mpirun), predict img/s per communication mode"),
}
# Sub-command attributes that name the second word of a command (``hvd-yolo shards verify``).
ACTION_ATTRS = ("action", "model_command", "bench")


class CommandError(Exception):
    """A mistake reported as ``hvd-yolo CMD: error: MESSAGE`` with exit ``code``, no traceback.

    ``show=False`` on the ranks that must not repeat a message rank 0 prints.
    """

    code = 2

    def __init__(self, message: str, *, show: bool = True) -> None:
        super().__init__(message)
        self.show = show


class UsageError(CommandError):
    """A usage or configuration mistake: exit 2."""

    code = 2


class RunError(CommandError):
    """A run that failed (bad data, a failed step): exit 1."""

    code = 1


def write_json(path: str | None, obj: Any) -> None:
    """``--json PATH`` for every command: write ``obj`` to PATH, or to stdout for ``-``."""
    if not path:
        return
    text = json.dumps(obj, indent=1, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write ({e.strerror or e})") from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only ``command``'s module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="hvd-yolo", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hvd-yolo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def prog_name(args: argparse.Namespace) -> str:
    """``hvd-yolo CMD [ACTION]`` as argparse names the command in its own errors."""
    words = [args.command] + [str(getattr(args, a)) for a in ACTION_ATTRS
                              if getattr(args, a, None)]
    return " ".join(["hvd-yolo", *words])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser, like its other usage errors
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CommandError as e:  # the one place a command's mistake is printed
        if e.show:
            print(f"{prog_name(args)}: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except Exception as e:
        if type(e).__name__ != "HorovodInternalError":
            raise
        # Horovod shut down under this rank because another rank failed: that rank printed why.
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "?"))
        print(f"{prog_name(args)}: error: rank {rank}: stopped, another rank failed (its error "
              "is printed above)", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
