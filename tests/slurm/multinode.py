"""A Slurm cluster across the nodes of a simulated cluster (hvd_yolo.cluster).

slurmctld runs on the login node, one ``slurmd -N NODE`` in each node's namespace (under the
node's hostname), munged on this machine (its socket is a file, which every namespace sees).
Client commands (sbatch, scontrol, sinfo) run on the login node, as on a real cluster. The
configuration is tests/slurm/cluster.py's, with the controller and node lines replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hvd_yolo import cluster
from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, _sbin, node_hardware

# `ip netns exec` mounts a fresh /sys without the cgroup hierarchies slurmd checks for at start:
# mount the machine's (cgroup v1) controllers again inside the node's mount namespace. The nodes
# share one file system, /tmp included, where srun's PMIx plugin makes a folder per step on
# every node: each node gets its own folder at PMIX_DIR (mpi.conf PMIxCliTmpDirBase).
PMIX_DIR = "/run/hvd-yolo-pmix"
NODE_SETUP = ("mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup && for c in cpu cpuacct cpuset "
              "memory devices freezer blkio pids none,name=systemd; do d=/sys/fs/cgroup/${c#*=} "
              "&& mkdir -p $d && mount -t cgroup -o $c cgroup $d || exit 1; done; mkdir -p "
              f"\"$0\" {PMIX_DIR} && mount --bind \"$0\" {PMIX_DIR} && exec \"$@\"")


@dataclass
class MultiNodeSlurm(SlurmCluster):
    name: str = "sim"  # the simulated cluster's name
    nodes: list[int] = field(default_factory=lambda: [1, 2])

    @property
    def hosts(self) -> list[str]:
        return [cluster.hostname(self.name, k) for k in self.nodes]

    def write_config(self) -> None:
        super().write_config()
        info = cluster.status(self.name)
        if not info["up"]:
            raise SlurmUnavailable(f"simulated cluster {self.name!r} is not up")
        addr = {host: node["address"] for host, node in info["nodes"].items()}
        login = cluster.hostname(self.name, cluster.LOGIN)
        cpus, mem = node_hardware()
        per_node = max(1, cpus // len(self.nodes))
        lines = [f"NodeName={h} NodeAddr={addr[h]} CPUs={per_node} RealMemory="
                 f"{mem // len(self.nodes)} State=UNKNOWN" for h in self.hosts]
        text = self.conf.read_text()
        text = re.sub(r"(?m)^SlurmctldHost=.*$", f"SlurmctldHost={login}({addr[login]})", text)
        text = re.sub(r"(?m)^SlurmdPidFile=(.*)/slurmd\.pid$", r"SlurmdPidFile=\1/slurmd-%n.pid",
                      text)
        text = re.sub(r"(?m)^SlurmdLogFile=(.*)/slurmd\.log$", r"SlurmdLogFile=\1/slurmd-%n.log",
                      text)
        text = re.sub(r"(?m)^NodeName=.*$", "\n".join(lines), text)
        text = re.sub(r"(?m)^PartitionName=(\S+) Nodes=\S+",
                      rf"PartitionName=\1 Nodes={','.join(self.hosts)}", text)
        self.conf.write_text(text)
        (self.conf.parent / "mpi.conf").write_text(f"PMIxCliTmpDirBase={PMIX_DIR}\n")
        for host in self.hosts:
            (self.root / "spool" / f"slurmd-{host}").mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90) -> MultiNodeSlurm:
        """munged here, slurmctld on the login node, a slurmd per node; wait until all idle."""
        self.write_config()
        self._start_munged()
        self._spawn("slurmctld", cluster.exec_argv(
            self.name, [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)]))
        self._wait(self._ctld_up, 40, "slurmctld to answer")
        for k, host in zip(self.nodes, self.hosts):
            self._spawn(f"slurmd-{host}", cluster.exec_argv(self.name, [
                "sh", "-c", NODE_SETUP, str(self.root / "pmix" / host), _sbin("slurmd"), "-D",
                "-N", host, "-f", str(self.conf)], k))
        self._wait(self.node_idle, timeout, f"nodes {self.hosts} idle in sinfo")
        return self

    def node_state(self) -> str:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N=%T"], check=False)
        return " ".join(p.stdout.split())

    def node_idle(self) -> bool:
        states = dict(x.split("=", 1) for x in self.node_state().split() if "=" in x)
        return all(states.get(h, "").rstrip("*~#") == "idle" for h in self.hosts)

    def run(self, argv, check=True, timeout=30, env=None, cwd=None):
        """A Slurm client command, run on the login node."""
        return super().run(cluster.exec_argv(self.name, list(argv)), check, timeout, env, cwd)

    def stop(self) -> None:
        super().stop()
        try:
            Path(PMIX_DIR).rmdir()  # the mount point, empty on this machine
        except OSError:
            pass

    def tail(self, name: str, n: int = 4000) -> str:
        if name == "slurmd":  # every node's slurmd
            return "".join(super(MultiNodeSlurm, self).tail(f"slurmd-{h}", n) for h in self.hosts)
        return super().tail(name, n)
