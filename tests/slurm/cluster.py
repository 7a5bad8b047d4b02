"""A throw-away single-node Slurm cluster on this machine (munged + slurmctld + slurmd).

Used by ``tests/test_slurm.py`` and runnable by hand::

    python -m tests.slurm.cluster up /tmp/slurm-test     # start, print `export SLURM_CONF=...`
    SLURM_CONF=/tmp/slurm-test/etc/slurm.conf sbatch ... # use it
    python -m tests.slurm.cluster down /tmp/slurm-test   # stop (also kills leftover job steps)

Everything lives under one folder: slurm.conf, the munge key and socket, state and spool
directories, daemon logs. The daemons listen on free ports on 127.0.0.1 so they never meet a
real cluster's. It needs root (slurmd and ``SlurmUser=root``) and Debian's ``slurm-wlm`` and
``munge`` packages; :func:`ensure_packages` installs them with apt-get when they are missing.
Containers usually cannot use cgroups, so the configuration uses ``proctrack/linuxproc``,
``task/none`` and no accounting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "sinfo", "scontrol")
_APT_MARKER = Path("/tmp/.hvd_yolo_apt_updated")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (tests skip with it)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_packages(timeout: float = 600) -> None:
    """Install Debian's slurm-wlm and munge when missing (root + apt-get), else raise."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing_binaries())}) and "
                               "not root, so they cannot be installed")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm binaries missing and apt-get not found (not Debian/Ubuntu)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    steps = []
    if not _APT_MARKER.exists():
        steps.append(["apt-get", "update", "-qq"])
    steps.append(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES])
    for argv in steps:
        left = max(1.0, deadline - time.monotonic())
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired as exc:
            raise SlurmUnavailable(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout)[-800:]}")
        if argv[1] == "update":
            _APT_MARKER.touch()
    if missing_binaries():
        raise SlurmUnavailable(f"still missing after apt-get install: {missing_binaries()}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory MiB) as slurmd itself detects them (``slurmd -C``)."""
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    try:
        out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True,
                             timeout=30).stdout
        cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
        mem = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    except (OSError, subprocess.SubprocessError, AttributeError, ValueError):
        pass
    return cpus, mem


@dataclass
class SlurmCluster:
    """One munged + slurmctld + slurmd under ``root``; use as a context manager or start/stop."""

    root: Path
    partition: str = "debug"
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    # ------------------------------------------------------------------ paths and env
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket.2"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, sinfo...) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    # ------------------------------------------------------------------ configuration
    def write_config(self) -> None:
        for sub in ("etc", "munge", "state", f"spool/slurmd-{self.node}", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        cpus, mem = node_hardware()
        ctld_port, slurmd_port = _free_port(), _free_port()
        (self.root / "etc" / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm/cluster.py: a single-node test cluster, no cgroups, no accounting.
ClusterName=hvdyolotest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
KillWait=30
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ daemons
    def _start_munged(self) -> None:
        """munged on this cluster's own socket and key; wait for its socket."""
        m = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                               f"--log-file={self.log('munged')}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=self.root)
        out.close()
        self.pids[name] = proc.pid
        (self.root / "run" / "pids.json").write_text(json.dumps(self.pids))
        time.sleep(0.5)
        if proc.poll() is not None:
            raise SlurmUnavailable(f"{name} exited at once ({proc.returncode}): "
                                   f"{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        text = ""
        for p in (self.root / "log" / f"{name}.stdout", self.log(name)):
            if p.exists():
                text += f"\n--- {p} ---\n" + p.read_text(errors="replace")[-n:]
        return text

    def start(self, timeout: float = 90) -> SlurmCluster:
        """Write the configuration, start the three daemons, wait until the node is idle."""
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"missing Slurm/munge binaries: {missing}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("a test Slurm cluster needs root (slurmd, SlurmUser=root)")
        self.write_config()
        self._start_munged()
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(self._ctld_up, 40, "slurmctld to answer")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self.node_idle, timeout, f"node {self.node} idle in sinfo")
        return self

    def _ctld_up(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).returncode == 0

    def node_state(self) -> str:
        p = self.run(["sinfo", "-h", "-N", "-o", "%T", "-n", self.node], check=False)
        return p.stdout.strip()

    def node_idle(self) -> bool:
        return self.node_state().rstrip("*~#") == "idle"

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise SlurmUnavailable(f"{name} died while waiting for {what}:"
                                           f"{self.tail(name)}")
            if ok():
                return
            time.sleep(0.5)
        logs = "".join(self.tail(n) for n in self.pids)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what} "
                               f"(node state {self.node_state()!r}):{logs}")

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, kill every leftover process of this cluster."""
        if self.pids and self._pids_alive():
            self.run(["scancel", "--full", "--partition", self.partition], check=False)
        stop_processes(self.root, self.conf, self.pids)
        self.pids.clear()

    def _pids_alive(self) -> bool:
        return any(_alive(p) for p in self.pids.values())

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def run(self, argv: list[str], check: bool = True, timeout: float = 30,
            env: dict[str, str] | None = None, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess:
        full_env = self.env
        full_env.update(env or {})
        full_env["SLURM_CONF"] = str(self.conf)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=full_env, cwd=cwd)
        except subprocess.TimeoutExpired as exc:
            if check:
                raise AssertionError(f"`{' '.join(argv)}` timed out after {timeout} s") from exc
            return subprocess.CompletedProcess(argv, -1, "", "timeout")
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(argv)}` failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> int:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, StdOut...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, ok, timeout: float, what: str, job_id: int | None = None) -> None:
        """Poll ``ok()`` until true; AssertionError with the job's state and logs on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if job_id is not None and self.job(job_id).get("JobState") in FINAL_STATES:
                if ok():
                    return
                raise AssertionError(f"job {job_id} ended while waiting for {what}: "
                                     f"{self.job(job_id)}")
            time.sleep(0.5)
        info = self.job(job_id) if job_id is not None else {}
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {info}"
                             f"{self.tail('slurmd')}")

    def wait_job(self, job_id: int, timeout: float = 300, states=FINAL_STATES
                 ) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; AssertionError with logs on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
                             f"{info}{self.tail('slurmd')}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cluster_processes(conf: Path) -> list[int]:
    """This cluster's step daemons and job processes: environment ``SLURM_CONF=conf`` and
    either a Slurm daemon's name or ``SLURM_JOB_ID`` (so a user's shell that merely exported
    SLURM_CONF is left alone)."""
    needle = f"SLURM_CONF={conf}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in (os.getpid(), os.getppid()):
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if needle in env and (comm in ("slurmstepd", "slurmd", "slurmctld", "munged")
                              or any(e.startswith(b"SLURM_JOB_ID=") for e in env)):
            found.append(int(d.name))
    return found


def stop_processes(root: Path, conf: Path, pids: dict[str, int], grace: float = 10) -> None:
    """SIGTERM the daemons (slurmd first), then anything still running under this cluster."""
    for name in ("slurmd", "slurmctld", "munged"):
        pid = pids.get(name)
        if pid and _alive(pid):
            _signal(pid, signal.SIGTERM)
            _reap(pid, grace)
    leftovers = cluster_processes(conf)
    for pid in leftovers:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while leftovers and time.monotonic() < deadline:
        leftovers = [p for p in leftovers if _alive(p)]
        time.sleep(0.2)
    for pid in leftovers + [p for p in pids.values() if _alive(p)]:
        _signal(pid, signal.SIGKILL)
        _reap(pid, 2)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not _alive(pid):
                return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.slurm.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("root", type=Path, help="folder for config, state, logs (created)")
    p.add_argument("--install", action="store_true", help="apt-get install slurm-wlm munge")
    a = p.parse_args(argv)
    cluster = SlurmCluster(a.root)
    pid_file = cluster.root / "run" / "pids.json"
    if a.action == "up":
        if a.install:
            ensure_packages()
        try:
            cluster.start()
        except SlurmUnavailable as exc:
            cluster.stop()
            print(f"could not start Slurm: {exc}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if a.action == "status":
        print(cluster.run(["sinfo"], check=False).stdout)
        return 0
    cluster.pids = json.loads(pid_file.read_text()) if pid_file.exists() else {}
    cluster.stop()
    print(f"stopped the cluster under {cluster.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
