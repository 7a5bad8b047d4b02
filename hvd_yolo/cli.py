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
import math
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
    "anchors": ("hvd_yolo.commands.anchors",
                "anchors for a dataset (k-means + refinement) and their best-possible recall"),
    "train": ("hvd_yolo.commands.train",
              "train on shards under mpirun/horovodrun (or in one process); resumable"),
    "eval": ("hvd_yolo.commands.eval", "COCO mAP of a checkpoint on a shard directory"),
    "detect": ("hvd_yolo.commands.detect",
               "find objects in images, folders or shards with a checkpoint"),
    "export": ("hvd_yolo.commands.export",
               "write a checkpoint as ONNX or TorchScript (raw, decoded, or with NMS)"),
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


# command -> {argument dest: (option, recogniser of an earlier output, what it is)}: the
# paths a command writes besides ``--json`` (guarded by ``guard_outputs`` before it runs).
OUTPUT_OPTIONS: dict[str, dict[str, tuple[str, str, str]]] = {
    "eval": {"results": ("--results", "is_detections", "a detections file (COCO results json)")},
    "detect": {"out": ("--out", "is_detections", "a detections file written by hvd-yolo detect")},
    "train": {"timeline": ("--timeline", "is_timeline", "a Horovod timeline")},
}


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def launch_rank() -> str:
    """This process's rank as the launcher set it ("0" when started alone)."""
    return os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK",
                          os.environ.get("PMI_RANK", "0")))


def guard_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the command runs, any output path that would replace an input or a file
    of another kind (:func:`hvd_yolo.outputs.guard_output`); every rank checks, rank 0 says it."""
    from hvd_yolo import outputs

    options = dict(OUTPUT_OPTIONS.get(args.command, {}))
    for dest in ("json", "json_path"):  # (the benchmarks name their --json json_path)
        options[dest] = ("--json", "is_json", "an earlier --json output (a JSON object)")
    given = {dest: getattr(args, dest, None) for dest in options}
    given = {dest: v for dest, v in given.items() if v is not None and v != "-"}
    if not given:
        return
    inputs = outputs.input_paths(v for k, v in vars(args).items() if k not in options)
    for dest, path in given.items():
        option, recogniser, what = options[dest]
        try:
            outputs.guard_output(path, option, getattr(outputs, recogniser), inputs, what)
        except outputs.OutputError as e:
            raise UsageError(str(e), show=launch_rank() == "0") from None


def write_json(path: str | None, obj: Any) -> None:
    """``--json PATH`` for every command: write ``obj`` to PATH, or to stdout for ``-``
    (strict JSON: NaN and inf are written as null)."""
    if not path:
        return
    text = json.dumps(strict_json(obj), indent=1, default=str, allow_nan=False) + "\n"
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
    """Run one command; a closed stdout (``| head``) ends it quietly, as SIGPIPE would."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        return closed_stdout()


def _main(argv: list[str] | None) -> int:
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
        guard_outputs(args)
        return int(module.run(args) or 0)
    except CommandError as e:  # the one place a command's mistake is printed
        if e.show:
            print(f"{prog_name(args)}: error: {e}", file=sys.stderr, flush=True)
        end_workers()
        return e.code
    except Exception as e:
        if type(e).__name__ != "HorovodInternalError":
            raise
        # Horovod shut down under this rank because another rank failed: that rank printed why.
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "?"))
        print(f"{prog_name(args)}: error: rank {rank}: stopped, another rank failed (its error "
              "is printed above)", file=sys.stderr, flush=True)
        end_workers()
        return 1


def end_workers() -> None:
    """End the worker processes a failed command left (DataLoader workers ignore SIGTERM, so
    the interpreter's exit handler would wait for them forever), quietly: PyTorch's SIGCHLD
    handler would report each as "killed by signal" from an exit handler."""
    import multiprocessing

    children = multiprocessing.active_children()
    if not children:
        return
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def closed_stdout() -> int:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so that the
    interpreter's final flush does not print a traceback, and exit as a process killed by
    SIGPIPE would (141)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
