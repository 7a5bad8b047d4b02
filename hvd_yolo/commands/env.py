"""`hvd-yolo env`: the first thing to run on a new cluster.

Prints the versions of every piece of the stack, what Horovod was built with and whether
CUDA/NCCL are usable, then exits non-zero naming each required piece that is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import shutil
import subprocess
import sys
from typing import Any

REQUIRED = ("torch", "torchvision", "horovod", "mpi4py", "numpy", "h5py", "pycocotools")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout only)")


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "missing", reported below
        return None
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return getattr(mod, "__version__", "unknown")


def collect() -> tuple[dict[str, Any], list[str]]:
    """(report, problems): versions and build facts, and every required piece that is missing."""
    problems: list[str] = []
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for module in REQUIRED:
        info[module] = _version(module)
        if info[module] is None:
            problems.append(f"python package {module!r} cannot be imported (run `make install`)")
    if info["mpi4py"]:
        try:
            from mpi4py import MPI

            info["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"mpi4py cannot load the MPI library: {exc}")
    mpirun = shutil.which("mpirun")
    info["mpirun"] = mpirun
    if mpirun:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, check=False)
        info["mpirun_version"] = (out.stdout or out.stderr).strip().splitlines()[0]
    else:
        problems.append("mpirun not found on PATH (Debian: apt-get install openmpi-bin)")
    if info["h5py"]:
        import h5py

        info["hdf5"] = h5py.version.hdf5_version
        info["hdf5_parallel"] = bool(h5py.get_config().mpi)
    if info["torch"]:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = torch.cuda.device_count() if info["cuda_available"] else 0
        info["torch_threads"] = torch.get_num_threads()
    if info["horovod"]:
        try:
            from hvd_yolo.comm.horovod import build_info

            info.update({f"horovod_{k}": v for k, v in build_info().items() if k != "horovod"})
            ctl = info["horovod_controllers"]
            if not ctl["mpi"]:
                problems.append("Horovod was built without the MPI controller (rebuild: make install)")
            if not ctl["gloo"]:
                problems.append("Horovod was built without the Gloo controller (rebuild: make install)")
            if info.get("cuda_available") and not info["horovod_tensor_operations"]["nccl"]:
                problems.append("a GPU is present but Horovod has no NCCL (HVD_YOLO_GPU=1 make install)")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"horovod.torch cannot be loaded: {exc} (rebuild: make install)")
    return info, problems


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.cli import write_json

    info, problems = collect()
    if args.json != "-":
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in value.items())
            print(f"{key:<{width}}  {value if value is not None else 'MISSING'}")
        for p in problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
        print("environment OK" if not problems else f"{len(problems)} problem(s) found")
    write_json(args.json, {**info, "problems": problems})
    return 1 if problems else 0
