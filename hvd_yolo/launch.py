"""The Open MPI launch line recommended for Horovod: built here only.

``mpi/mpirun.sh`` (which prints it with ``--dry-run``), the demo and the tests all use
:func:`mpirun_argv`. ``-bind-to none -map-by slot`` lets each rank's threads use its cores;
``mpi_yield_when_idle`` (CPU runs) stops Open MPI's busy-polling from stealing the compute
thread's core while Horovod's background thread waits (2 CPU cores: 2-rank efficiency 0.61 ->
0.92). ``network`` makes the job TCP-only on one subnet or interface, as between nodes.

``python hvd_yolo/launch.py mpirun-line [options] -- COMMAND...`` prints the line, one argument
per NUL-terminated field (what ``mpi/mpirun.sh`` reads; standard library only, so it runs as a
file without the package installed).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# Variables every rank needs, also on other nodes (mpirun passes nothing else there).
FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "MKL_NUM_THREADS",
                 "CUDA_VISIBLE_DEVICES")
FORWARD_PREFIXES = ("HOROVOD_", "NCCL_", "HVD_YOLO_", "TORCH_", "OMP_", "HDF5_", "PYTHON")
# Open MPI's TCP transport (benchmarks/NOTES.md, "MPI at the link rate"). By default it sends
# all of a large message past its first 192 KiB as one emulated-RDMA put, and the put request
# of the opposite direction waits behind that on the pair's connection: the two directions
# take turns (0.5 of the link). 128 KiB put fragments let them interleave (0.9-0.97).
TCP_MCA: dict[str, str] = {"btl_tcp_rdma_pipeline_frag_size": "131072"}


def is_subnet(network: str) -> bool:
    try:
        ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False
    return "/" in network


def mpirun_argv(np: int | None = None, *, hostfile: str | None = None, hosts: str | None = None,
                network: str | None = None, iface: str | None = None,
                cpus_per_rank: int | None = None, gpu: bool | None = None,
                ssh_port: int | None = None, term_grace: int | None = None,
                tag_output: bool = False, tcp_links: int | None = None,
                tcp_mca: dict[str, str] | None = None,
                extra: list[str] | None = None) -> list[str]:
    """``mpirun`` with Horovod's recommended options for this job (command not included).

    ``network`` (a subnet like ``10.1.0.0/16`` or an interface) makes MPI TCP-only on it
    (``btl tcp,self``: no shared memory, as between real nodes); ``iface`` only pins the TCP
    traffic to an interface. ``gpu=None`` asks nvidia-smi."""
    mpirun = shutil.which(os.environ.get("MPIRUN", "mpirun"))
    if mpirun is None:
        raise RuntimeError("mpirun not found: install Open MPI (Debian: apt-get install openmpi-bin "
                           "libopenmpi-dev; or run `make install`)")
    gpu = detect_gpu() if gpu is None else gpu
    argv = [mpirun]
    if np is not None:
        argv += ["-np", str(np)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    if hosts:
        argv += ["-H", hosts]
    # Ranks fill each node's slots and are not pinned (or pinned to N cores each).
    if cpus_per_rank:
        argv += ["-map-by", f"slot:PE={cpus_per_rank}", "-bind-to", "core"]
    else:
        argv += ["-bind-to", "none", "-map-by", "slot"]
    argv += ["-mca", "pml", "ob1", "-mca", "btl", "tcp,self" if network else "^openib"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    # Alone on this machine with more ranks than cores (a laptop, CI): allow oversubscription.
    if (not hostfile and not hosts and not os.environ.get("SLURM_JOB_ID") and np is not None
            and np > len(os.sched_getaffinity(0))):
        argv.append("--oversubscribe")
    if not gpu:  # CPU: Open MPI otherwise busy-polls, stealing the cores from compute
        argv += ["--mca", "mpi_yield_when_idle", "1"]
    for key, value in (TCP_MCA if tcp_mca is None else tcp_mca).items():
        argv += ["--mca", key, value]
    if tcp_links:  # TCP connections per peer pair (Open MPI's default: 1)
        argv += ["--mca", "btl_tcp_links", str(tcp_links)]
    net = network or iface
    if net:
        argv += ["--mca", "btl_tcp_if_include", net, "--mca", "oob_tcp_if_include", net]
    if ssh_port:
        argv += ["--mca", "plm_rsh_args", f"-p {ssh_port}"]
    if term_grace is not None:
        argv += ["--mca", "odls_base_sigkill_timeout", str(term_grace)]
    if tag_output:
        argv.append("--tag-output")
    # Export what the ranks need; `-x HOROVOD_*` is not mpirun syntax: list each name.
    for var in sorted(os.environ):
        if var in FORWARD_NAMES or var.startswith(FORWARD_PREFIXES):
            argv += ["-x", var]
    return argv + list(extra or [])


def network_env(network: str | None = None, iface: str | None = None) -> dict[str, str]:
    """Gloo's and NCCL's interface variables for an interface name (a subnet sets none)."""
    name = iface or (network if network and not is_subnet(network) else None)
    return {"HOROVOD_GLOO_IFACE": name, "NCCL_SOCKET_IFNAME": name} if name else {}


def detect_gpu() -> bool:
    """True when nvidia-smi lists a GPU on this node (HVD_YOLO_GPU=0|1 decides first)."""
    forced = os.environ.get("HVD_YOLO_GPU")
    if forced in ("0", "1"):
        return forced == "1"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    import subprocess

    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.startswith("GPU") for line in out.splitlines())


def hvd_yolo_argv(*args: str) -> list[str]:
    """The ``hvd-yolo`` entry point of this interpreter's environment, with arguments."""
    exe = VENV_BIN / "hvd-yolo"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "hvd_yolo.cli", *args]


def main(argv: list[str] | None = None) -> int:
    """``mpirun-line``: print :func:`mpirun_argv` + COMMAND, NUL-separated (mpi/mpirun.sh)."""
    p = argparse.ArgumentParser(prog="hvd_yolo/launch.py")
    sub = p.add_subparsers(dest="what", required=True)
    line = sub.add_parser("mpirun-line")
    line.add_argument("--np", type=int)
    line.add_argument("--hostfile")
    line.add_argument("--hosts")
    line.add_argument("--network")
    line.add_argument("--iface")
    line.add_argument("--cpus-per-rank", type=int)
    line.add_argument("--gpu", choices=("0", "1"))
    line.add_argument("--ssh-port", type=int)
    line.add_argument("--term-grace", type=int)
    line.add_argument("--extra", action="append", default=[])
    line.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("tcp-mca", help="print TCP_MCA as --mca options (mpi/horovodrun.sh's line)")
    args = p.parse_args(argv)
    if args.what == "tcp-mca":
        print(" ".join(f"--mca {key} {value}" for key, value in TCP_MCA.items()))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.environ.update(network_env(args.network, args.iface))
    out = mpirun_argv(args.np, hostfile=args.hostfile, hosts=args.hosts, network=args.network,
                      iface=args.iface, cpus_per_rank=args.cpus_per_rank,
                      gpu=None if args.gpu is None else args.gpu == "1",
                      ssh_port=args.ssh_port, term_grace=args.term_grace, extra=args.extra)
    sys.stdout.write("".join(a + "\0" for a in out + command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
