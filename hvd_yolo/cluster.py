"""A simulated multi-node cluster on one Linux machine: one network namespace per node.

Each node is a network namespace with its own hostname, one veth link into a shared bridge,
a ``tc`` rate limit on both ends of that link, and a real ``sshd`` that accepts the cluster's
own key, so ``mpirun --hostfile`` and ``horovodrun -H`` launch exactly as on a real cluster.
A ``login`` namespace on the same bridge is where jobs are started from (like a cluster's
login node): ``horovodrun`` needs its launcher on the nodes' network.

Names: namespaces ``hvdc-NAME-K`` (``hvdc-NAME-login``), bridge ``hvdc-NAME``, per-namespace
files in ``/etc/netns/hvdc-NAME-*`` (``hosts`` and an ``ssh`` folder that ``ip netns exec``
mounts over ``/etc``), state (keys, ``hostfile``, ``cluster.json``) in ``state_dir(NAME)``.
``down`` finds everything by those names, so it also cleans up after a crash. Over 350 lines
on purpose: one job, a simulated multi-node cluster; up, status and down share that naming
scheme, and down must undo what up does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ALLOWED = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
IFACE = "hvdnet0"  # the node-side interface name, the same in every namespace
LOGIN = "login"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
TOOLS = ("ip", "tc", "unshare", "ssh", "ssh-keygen")
SSHD = "/usr/sbin/sshd"


class ClusterError(RuntimeError):
    """A user-facing failure: the message says what is wrong and what to do."""


@dataclass
class Spec:
    name: str = "sim"
    nodes: int = 2
    link: str = "10gbit"
    slots: int = 1
    subnet: str = "198.18.0.0/24"
    latency_ms: float = 0.0


def state_root() -> Path:
    return Path(os.environ.get("HVD_YOLO_CLUSTER_DIR", "/run/hvd-yolo-cluster"))


def state_dir(name: str) -> Path:
    return state_root() / name


def rate_bps(rate: str) -> float:
    """``'10gbit'`` -> 1e10 bits per second (tc's units)."""
    m = RATE_RE.match(rate.strip().lower())
    if not m:
        raise ClusterError(f"link rate {rate!r} is not a tc rate: use e.g. 1gbit, 500mbit, 10gbit")
    return float(m.group(1)) * UNIT[m.group(2)]


def hostname(name: str, k: int | str) -> str:
    return f"{name}-{LOGIN}" if k == LOGIN else f"{name}{k}"


def netns(name: str, k: int | str) -> str:
    return f"hvdc-{name}-{k}"


def address(spec: Spec, k: int | str) -> str:
    """Node K gets the subnet's K-th address; the login node the last usable one."""
    net = ipaddress.ip_network(spec.subnet)
    return str(net[-2] if k == LOGIN else net[int(k)])


def validate(spec: Spec) -> None:
    """Raise ClusterError for a bad name, node count, rate, subnet or latency."""
    if not NAME_RE.match(spec.name):
        raise ClusterError(f"cluster name {spec.name!r}: 1-8 lower-case letters/digits, "
                           "starting with a letter")
    if not 1 <= spec.nodes <= 64:
        raise ClusterError(f"--nodes must be 1..64, got {spec.nodes}")
    if spec.slots < 1:
        raise ClusterError(f"--slots must be >= 1, got {spec.slots}")
    rate_bps(spec.link)
    try:
        net = ipaddress.ip_network(spec.subnet)
    except ValueError as exc:
        raise ClusterError(f"--subnet {spec.subnet!r}: {exc}") from None
    if not net.subnet_of(ALLOWED) or net.num_addresses < spec.nodes + 3:
        raise ClusterError(f"--subnet {spec.subnet} must lie inside {ALLOWED} (the range set "
                           f"aside for benchmarking) and hold {spec.nodes} nodes + login")
    if spec.latency_ms < 0:
        raise ClusterError(f"--latency-ms must be >= 0, got {spec.latency_ms}")


def missing_requirements() -> list[str]:
    """What this machine lacks to run a cluster (empty when it can)."""
    missing = [f"{t} (iproute2/openssh-client)" for t in TOOLS if shutil.which(t) is None]
    if not Path(SSHD).exists():
        missing.append(f"{SSHD} (Debian: apt-get install openssh-server)")
    if not _has_net_admin():
        missing.append("root / CAP_NET_ADMIN (network namespaces need it: run as root)")
    return missing


def _has_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)  # CAP_NET_ADMIN = 12
    return False


def _run(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(full)}` failed: {proc.stderr.strip() or proc.stdout}")
    return proc


def list_namespaces(name: str | None = None) -> list[str]:
    """This machine's cluster namespaces (of cluster ``name``, or of every cluster)."""
    out = _run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    prefix = f"hvdc-{name}-" if name else "hvdc-"
    return sorted(n for n in names if n.startswith(prefix))


def _shape(dev: str, spec: Spec, ns: str | None) -> None:
    """Rate-limit ``dev``'s egress (tbf); with latency, netem delay in front of it."""
    bps = rate_bps(spec.link)
    burst = max(256 * 1024, int(bps / 8 / 1000))  # >= 1 ms of traffic and a 64 KiB GSO burst
    tbf = ["tbf", "rate", spec.link, "burst", str(burst), "latency", "50ms"]
    if spec.latency_ms <= 0:
        _run("tc", "qdisc", "replace", "dev", dev, "root", *tbf, ns=ns)
        return
    proc = _run("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "delay",
                f"{spec.latency_ms}ms", ns=ns, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"--latency-ms {spec.latency_ms}: the netem qdisc is not available "
                           f"in this kernel ({proc.stderr.strip()}), so no delay can be added "
                           "here; run without --latency-ms (or load sch_netem)")
    _run("tc", "qdisc", "replace", "dev", dev, "parent", "1:", "handle", "10:", *tbf, ns=ns)


def _keygen(path: Path) -> str:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.parent.name, "-f", str(path))
    return path.with_suffix(".pub").read_text().strip()


def _sshd_config(spec: Spec, k: int, d: Path) -> str:
    return "\n".join([
        f"ListenAddress {address(spec, k)}", "Port 22",
        f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {state_dir(spec.name) / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "MaxStartups 200", "MaxSessions 200", "X11Forwarding no", "PrintMotd no",
        "AcceptEnv HOROVOD_* OMPI_* PMIX_*", ""])


def _ssh_config(spec: Spec) -> str:
    hosts = " ".join(hostname(spec.name, k) for k in range(1, spec.nodes + 1))
    d = state_dir(spec.name)
    return "\n".join([
        f"Host {hosts} {hostname(spec.name, LOGIN)}", "  User root",
        f"  IdentityFile {d / 'id_ed25519'}", f"  GlobalKnownHostsFile {d / 'known_hosts'}",
        "  UserKnownHostsFile /dev/null", "  StrictHostKeyChecking yes", "  BatchMode yes",
        "  ConnectTimeout 10", "  ServerAliveInterval 5", "  ServerAliveCountMax 3",
        "  LogLevel ERROR", ""])


def up(spec: Spec, regime: dict | None = None) -> dict:
    """Create cluster ``spec.name``; on any failure everything created is removed again.

    ``regime`` (hvd_yolo.regime.plan_link's record) is kept in cluster.json."""
    validate(spec)
    missing = missing_requirements()
    if missing:
        raise ClusterError("cannot build a simulated cluster here, missing: " + "; ".join(missing))
    if list_namespaces(spec.name) or _link_exists(bridge(spec.name)):
        raise ClusterError(f"cluster {spec.name!r} is already up (hvd-yolo cluster status "
                           f"--name {spec.name}); take it down first: hvd-yolo cluster down "
                           f"--name {spec.name}")
    try:
        return _up(spec, regime)
    except BaseException:
        down(spec.name)
        raise


def bridge(name: str) -> str:
    return f"hvdc-{name}"


def _link_exists(dev: str) -> bool:
    return _run("ip", "link", "show", dev, check=False).returncode == 0


def _up(spec: Spec, regime: dict | None = None) -> dict:
    d = state_dir(spec.name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, mode=0o700)
    client_pub = _keygen(d / "id_ed25519")
    (d / "authorized_keys").write_text(client_pub + "\n")
    prefix = ipaddress.ip_network(spec.subnet).prefixlen
    nodes: list[int | str] = [*range(1, spec.nodes + 1), LOGIN]
    # One bridge; per node a namespace, a veth into the bridge, an address, a rate limit.
    br = bridge(spec.name)
    _run("ip", "link", "add", br, "type", "bridge")
    _run("ip", "link", "set", br, "up")
    known = []
    for k in nodes:
        ns, host_end = netns(spec.name, k), f"hvdc{spec.name}{'l' if k == LOGIN else k}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", IFACE, "netns", ns)
        _run("ip", "link", "set", host_end, "master", br, "up")
        _run("ip", "addr", "add", f"{address(spec, k)}/{prefix}", "dev", IFACE, ns=ns)
        _run("ip", "link", "set", IFACE, "up", ns=ns)
        _run("ip", "link", "set", "lo", "up", ns=ns)
        _shape(host_end, spec, None)  # traffic into the node
        _shape(IFACE, spec, ns)  # traffic out of the node
        nd = d / str(k)
        nd.mkdir()
        known.append(f"{hostname(spec.name, k)},{address(spec, k)} {_keygen(nd / 'host_key')}")
    (d / "known_hosts").write_text("\n".join(known) + "\n")
    (d / "ssh_config").write_text(_ssh_config(spec))
    hosts = ["127.0.0.1 localhost"] + [f"{address(spec, k)} {hostname(spec.name, k)}"
                                        for k in nodes]
    # Files `ip netns exec` mounts over /etc in each namespace: names and the ssh client set-up.
    for k in nodes:
        etc = Path("/etc/netns", netns(spec.name, k))
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("\n".join(hosts) + "\n")
        (etc / "hostname").write_text(hostname(spec.name, k) + "\n")
        shutil.copy(d / "ssh_config", etc / "ssh" / "ssh_config")
        shutil.copy(d / "known_hosts", etc / "ssh" / "ssh_known_hosts")
    # A real sshd per node, in its own UTS namespace so that the node has its own hostname.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    for k in nodes[:-1]:
        (d / str(k) / "sshd_config").write_text(_sshd_config(spec, k, d / str(k)))
        _start_sshd(spec.name, k)
    hostfile = "".join(f"{hostname(spec.name, k)} slots={spec.slots}\n" for k in nodes[:-1])
    (d / "hostfile").write_text(hostfile)
    info = {"spec": asdict(spec), "state_dir": str(d), "hostfile": str(d / "hostfile"),
            "iface": IFACE, "bridge": br, "regime": regime,
            "nodes": {hostname(spec.name, k): {"netns": netns(spec.name, k),
                                               "address": address(spec, k)} for k in nodes}}
    (d / "cluster.json").write_text(json.dumps(info, indent=1) + "\n")
    _wait_for_ssh(spec.name, list(range(1, spec.nodes + 1)))
    return info


def _start_sshd(name: str, k: int) -> None:
    """Start node K's sshd (it daemonizes) under the node's own hostname."""
    nd = state_dir(name) / str(k)
    _run("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname(name, k), SSHD,
         "-f", str(nd / "sshd_config"), "-E", str(nd / "sshd.log"), ns=netns(name, k))


def start_node(name: str, k: int) -> None:
    """Bring a killed node back: restart its sshd and wait until it answers."""
    if netns(name, k) not in list_namespaces(name):
        raise ClusterError(f"cluster {name!r} has no node {k}")
    if not node_pids(name, k):
        _start_sshd(name, k)
    _wait_for_ssh(name, [k])


def _wait_for_ssh(name: str, nodes: list[int], timeout: float = 20.0) -> None:
    """Until every node answers ``ssh NODE hostname`` from the login node with its own name."""
    deadline = time.monotonic() + timeout
    for k in nodes:
        host = hostname(name, k)
        while True:
            proc = subprocess.run(exec_argv(name, ["ssh", host, "hostname"]),
                                  capture_output=True, text=True, timeout=30)
            if proc.returncode == 0 and proc.stdout.strip() == host:
                break
            if time.monotonic() > deadline:
                log = state_dir(name) / str(k) / "sshd.log"
                raise ClusterError(f"node {host} did not answer ssh within {timeout:.0f} s: "
                                   f"{proc.stderr.strip() or proc.stdout.strip()} (sshd log: "
                                   f"{log})")
            time.sleep(0.2)


def exec_argv(name: str, command: list[str], node: int | str = LOGIN) -> list[str]:
    """``command`` run on ``node`` (default: the login node) of cluster ``name``."""
    return ["ip", "netns", "exec", netns(name, node), "unshare", "--uts", "sh", "-c",
            'hostname "$0" && exec "$@"', hostname(name, node), *command]


def node_pids(name: str, node: int | str) -> list[int]:
    proc = _run("ip", "netns", "pids", netns(name, node), check=False)
    return [int(p) for p in proc.stdout.split()]


def kill_node(name: str, node: int | str) -> list[int]:
    """SIGKILL every process of ``node`` (its sshd and ranks): the node has died."""
    pids = node_pids(name, node)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def down(name: str) -> list[str]:
    """Remove cluster ``name``: processes, namespaces, links, /etc/netns files, state.

    Idempotent; works from the names alone, so it also cleans up after a crash."""
    removed = []
    for ns in list_namespaces(name):
        for pid in kill_node(name, ns[len(f"hvdc-{name}-"):]):
            removed.append(f"process {pid}")
        _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
        removed.append(f"namespace {ns}")
    if _link_exists(bridge(name)):
        _run("ip", "link", "del", bridge(name), check=False)
        removed.append(f"bridge {bridge(name)}")
    if state_dir(name).exists():
        shutil.rmtree(state_dir(name), ignore_errors=True)
        removed.append(f"state {state_dir(name)}")
    for folder in (Path("/etc/netns"), state_root()):  # made by `up`; kept if others use them
        try:
            folder.rmdir()
        except OSError:
            pass
    return removed


def interface_bytes(name: str, node: int | str) -> dict[str, int]:
    """The node's link byte counters (``rx``, ``tx``) as its kernel reports them."""
    base = "/sys/class/net/" + IFACE + "/statistics/"
    proc = _run("cat", base + "rx_bytes", base + "tx_bytes", ns=netns(name, node))
    rx, tx = (int(v) for v in proc.stdout.split())
    return {"rx": rx, "tx": tx}


def status(name: str) -> dict:
    """What is up: per node its namespace, address, sshd state and link qdisc."""
    info_path = state_dir(name) / "cluster.json"
    namespaces = list_namespaces(name)
    if not namespaces:
        return {"name": name, "up": False}
    info = json.loads(info_path.read_text()) if info_path.exists() else {"nodes": {}}
    for node in info.get("nodes", {}).values():
        k = node["netns"][len(f"hvdc-{name}-"):]
        node["processes"] = len(node_pids(name, k))
        node["up"] = node["netns"] in namespaces and (k == LOGIN or node["processes"] > 0)
        node["qdisc"] = _run("tc", "qdisc", "show", "dev", IFACE, ns=node["netns"],
                             check=False).stdout.strip()
    info.update({"name": name, "up": True, "namespaces": namespaces})
    return info
