"""docker/k8s/*.yaml (Kubeflow MPI Operator MPIJobs), checked without a cluster.

Both files parse and carry what the operator's v2beta1 API requires; the launcher of
mpijob.yaml runs the image's mpi/mpirun.sh (which relays a pod's SIGTERM to the ranks) with
this job's ranks, the operator's hostfile, GPU or CPU and a stop grace shorter than the pod's,
and it prints the mpirun line hvd_yolo/launch.py builds for them in the pod's environment (the
image's ENV plus the container's env); the hvd-yolo arguments parse with the train command's
own parser and keep `--resume auto`, and the elastic file's horovodrun arguments parse with
Horovod's parser.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hvd_yolo import config, launch
from hvd_yolo.commands import train as train_cmd
from tests.test_docker_static import instructions

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
MPIJOB, ELASTIC = K8S / "mpijob.yaml", K8S / "mpijob-elastic.yaml"
OPERATOR_HOSTFILE = "/etc/mpi/hostfile"  # written by the operator into the launcher pod
OPERATOR_DISCOVERY = "/etc/mpi/discover_hosts.sh"
# Environment the base images set that the Dockerfiles do not (only names launch.py forwards).
BASE_ENV = {"debian:": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            "nvidia/cuda:": {"PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:"
                                     "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"}}


def load(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def replica(job: dict, role: str) -> dict:
    return job["spec"]["mpiReplicaSpecs"][role]


def container(job: dict, role: str) -> dict:
    return replica(job, role)["template"]["spec"]["containers"][0]


def uses_gpu(job: dict) -> bool:
    limits = container(job, "Worker").get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0)) > 0


def image_env(image: str) -> dict[str, str]:
    """The environment of a pod running one of our images: base image, then Dockerfile ENV."""
    tag = image.rsplit(":", 1)[-1]
    dockerfile = REPO / "docker" / {"cpu": "Dockerfile", "cuda": "Dockerfile.cuda"}[tag]
    args = dict(a.split("=", 1) for k, a in instructions(dockerfile) if k == "ARG" and "=" in a)
    base = args.get("BASE_IMAGE") or args["CUDA_IMAGE"]
    env = dict(next(v for prefix, v in BASE_ENV.items() if base.startswith(prefix)))
    for kind, rest in instructions(dockerfile):
        if kind == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), value)
    return env


def pod_env(job: dict, role: str) -> dict[str, str]:
    c = container(job, role)
    return {**image_env(c["image"]), **{e["name"]: str(e["value"]) for e in c.get("env", [])}}


MPIRUN_SH = "/opt/hvd_yolo/mpi/mpirun.sh"  # the image's checkout (WORKDIR /opt/hvd_yolo)
# mpi/mpirun.sh's options that take a value (the others are flags)
MPIRUN_SH_VALUED = {"-np", "-n", "--np", "--hostfile", "-H", "--cpus-per-rank", "--network",
                    "--iface", "--ssh-port", "--term-grace", "--mpirun-arg"}


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher part, hvd-yolo arguments) of a launcher command: ``... hvd-yolo ARGS``, or
    ``mpi/mpirun.sh OPTIONS ARGS`` (ARGS start at its first non-option, as the script reads)."""
    if argv[0].endswith("mpi/mpirun.sh"):
        i = 1
        while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
            i += 2 if argv[i] in MPIRUN_SH_VALUED else 1
        return argv[:i], argv[i + (i < len(argv) and argv[i] == "--"):]
    assert "hvd-yolo" in argv, f"the launcher does not run hvd-yolo: {argv}"
    i = argv.index("hvd-yolo")
    return argv[:i], argv[i + 1:]


def options(launcher: list[str]) -> dict[str, str | bool]:
    """mpi/mpirun.sh's options of a launcher part: value, or True for a flag."""
    found, i = {}, 1
    while i < len(launcher):
        if launcher[i] in MPIRUN_SH_VALUED:
            found[launcher[i]], i = launcher[i + 1], i + 2
        else:
            found[launcher[i]], i = True, i + 1
    return found


# ------------------------------------------------------------------ both files
@pytest.mark.parametrize("path", [MPIJOB, ELASTIC], ids=lambda p: p.name)
def test_operator_v2beta1_fields(path: Path) -> None:
    job = load(path)
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["kind"] == "MPIJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert isinstance(spec["slotsPerWorker"], int) and spec["slotsPerWorker"] >= 1
    assert spec.get("mpiImplementation", "OpenMPI") == "OpenMPI"  # the images' MPI
    run_policy = spec["runPolicy"]
    assert run_policy["cleanPodPolicy"] in ("None", "Running", "All")
    assert isinstance(run_policy["backoffLimit"], int) and run_policy["backoffLimit"] >= 1
    assert set(spec["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
    launcher, worker = replica(job, "Launcher"), replica(job, "Worker")
    assert launcher["replicas"] == 1
    # A launcher restarted after a failure resumes (--resume auto below).
    assert launcher["restartPolicy"] == "OnFailure"
    assert worker["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
    assert isinstance(worker["replicas"], int) and worker["replicas"] >= 1
    for role in ("Launcher", "Worker"):
        pod = replica(job, role)["template"]["spec"]
        assert pod["containers"], f"{role} has no containers"
        for c in pod["containers"]:
            assert c["name"] and c["image"].rsplit(":", 1)[-1] in ("cpu", "cuda"), c
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{role}: volumeMount {m['name']!r} has no volume"
    assert container(job, "Launcher")["command"], "the launcher must say what it runs"
    assert (container(job, "Launcher")["image"] == container(job, "Worker")["image"])


@pytest.mark.parametrize("path", [MPIJOB, ELASTIC], ids=lambda p: p.name)
def test_workers_run_the_images_sshd_with_the_operators_keys(path: Path) -> None:
    """mpirun/horovodrun reach the workers over ssh: the entrypoint's sshd (port 2222, the
    port of the images' ssh client config) with the keys the operator mounts."""
    job = load(path)
    worker = container(job, "Worker")
    assert "command" not in worker and worker["args"] == ["sshd"]
    assert "  sshd)" in (REPO / "docker" / "entrypoint.sh").read_text()
    assert job["spec"]["sshAuthMountPath"] == "/root/.ssh"  # the images run as root
    assert re.search(r"Port 2222\b", (REPO / "docker" / "ssh_config").read_text())
    assert re.search(r"IdentityFile /root/\.ssh/id_rsa\b", (REPO / "docker" / "ssh_config").read_text())


@pytest.mark.parametrize("path", [MPIJOB, ELASTIC], ids=lambda p: p.name)
def test_train_arguments_parse_resume_auto_and_live_on_volumes(path: Path) -> None:
    job = load(path)
    _, args = split_command(container(job, "Launcher")["command"])
    assert args[0] == "train"
    parser = argparse.ArgumentParser(prog="hvd-yolo train", exit_on_error=False)
    train_cmd.add_arguments(parser)
    ns = parser.parse_args(args[1:])
    assert ns.resume == "auto", "a requeued/restarted launcher must continue, not start over"
    cfg = config.from_dict(config.apply_overrides({}, ns.overrides))
    mounts = {m["mountPath"]: m for m in container(job, "Worker").get("volumeMounts", [])}

    def mount_of(p: str) -> dict:
        hits = [m for mp, m in mounts.items() if p.startswith(mp.rstrip("/") + "/")]
        assert hits, f"{p} is on no volume of the worker pods: lost with the pod"
        return hits[0]

    assert mount_of(ns.config)  # the config (and the shards beside it) on the data volume
    out = mount_of(cfg.run.out_dir)  # checkpoints survive the pods
    assert not out.get("readOnly"), f"run.out_dir {cfg.run.out_dir} is on a read-only volume"
    claims = {v["name"]: v for v in replica(job, "Worker")["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in claims[out["name"]], "checkpoints need a persistent volume"


# ------------------------------------------------------------------ mpijob.yaml: the launcher
def test_launcher_runs_mpirun_sh_for_this_job() -> None:
    """The image's mpi/mpirun.sh (a pod's SIGTERM reaches every rank at once as SIGUSR1), with
    the job's ranks, the operator's hostfile, GPU when the workers have GPUs, and a stop grace
    that ends before Kubernetes kills the launcher."""
    job = load(MPIJOB)
    launcher, _ = split_command(container(job, "Launcher")["command"])
    assert launcher[0] == MPIRUN_SH, launcher
    opts = options(launcher)
    np = replica(job, "Worker")["replicas"] * job["spec"]["slotsPerWorker"]
    assert opts.get("-np") == str(np) and opts.get("--hostfile") == OPERATOR_HOSTFILE, opts
    assert ("--gpu" in opts) == uses_gpu(job) and ("--cpu" in opts) != uses_gpu(job), opts
    pod_grace = replica(job, "Launcher")["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 0 < int(opts["--term-grace"]) < pod_grace, "Kubernetes would kill the launcher first"


def test_launcher_prints_launch_pys_line_for_this_job(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's own command with --dry-run prints, in the pod's environment, the line
    hvd_yolo/launch.py builds for the job (with a stand-in for the operator's hostfile, which
    mpirun.sh reads)."""
    if os.geteuid() != 0 or shutil.which("mpirun") is None:
        pytest.skip("mpi/mpirun.sh prints the pod's line (root, mpirun present) only as root "
                    "with Open MPI installed")
    job = load(MPIJOB)
    launcher, args = split_command(container(job, "Launcher")["command"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("hvd-yolo-worker-0.hvd-yolo slots=4\n")
    opts = [str(hostfile) if o == OPERATOR_HOSTFILE else o for o in launcher[1:]]
    env = pod_env(job, "Launcher")
    env["PATH"] = f"{env['PATH']}:{os.environ['PATH']}"  # mpirun of this machine
    out = subprocess.run([str(REPO / "mpi" / "mpirun.sh"), "--dry-run", *opts, "--", *args],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    printed = shlex.split(out.stdout.strip().splitlines()[-1])
    # launch.py in the pod's environment (mpirun.sh adds HVD_YOLO_LAUNCH: its relay is on)
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in {**pod_env(job, "Launcher"), "HVD_YOLO_LAUNCH": "mpirun.sh",
                        "HDF5_USE_FILE_LOCKING": "FALSE", "MPIRUN": "mpirun"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: name)
    np = replica(job, "Worker")["replicas"] * job["spec"]["slotsPerWorker"]
    expected = launch.mpirun_argv(np, hostfile=str(hostfile), gpu=uses_gpu(job),
                                  term_grace=int(options(launcher)["--term-grace"]))
    printed[0] = Path(printed[0]).name  # mpirun as found on PATH
    assert printed[:len(expected)] == expected, (printed, expected)
    assert Path(printed[len(expected)]).name == "hvd-yolo" and printed[len(expected) + 1:] == args


# ------------------------------------------------------------------ mpijob-elastic.yaml
def test_elastic_horovodrun_arguments_parse_and_fit_the_workers() -> None:
    job = load(ELASTIC)
    line, _ = split_command(container(job, "Launcher")["command"])
    assert line[0] == "horovodrun" and "--gloo" in line  # elastic Horovod needs Gloo
    try:
        from horovod.runner.launch import parse_args
    except ImportError as e:
        pytest.skip(f"horovod not importable here: {e}")
    import sys

    argv = sys.argv
    try:
        sys.argv = [*line, "hvd-yolo"]
        args = parse_args()
    finally:
        sys.argv = argv
    slots = job["spec"]["slotsPerWorker"]
    assert args.host_discovery_script == OPERATOR_DISCOVERY
    assert args.slots == slots
    assert args.min_num_proc <= args.num_proc <= args.max_num_proc
    workers = replica(job, "Worker")["replicas"]
    assert args.max_num_proc <= workers * slots, "--max-np beyond the worker pods' slots"
    assert args.num_proc % slots == 0 and args.min_num_proc % slots == 0, "ranks in whole pods"
