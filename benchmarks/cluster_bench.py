#!/usr/bin/env python
"""make bench's cluster section: allreduce and 2-node training over rate-limited links.

    .venv/bin/python benchmarks/cluster_bench.py            # ~25 min on 2 cores
    .venv/bin/python benchmarks/cluster_bench.py --quick    # smoke run, ~4 min
    .venv/bin/python benchmarks/cluster_bench.py --sections train --rounds 3

Runs on a simulated cluster (hvd_yolo.cluster: namespaces, tbf-limited veth links, sshd),
started from its login node like a real job. Sections:
  allreduce  2 nodes x 1 rank, 1 and 10 Gbit/s links: `hvd-yolo bench allreduce` flat fp32
             buffers (Horovod cycle time 0.5 ms), launched by mpirun (MPI allreduce over
             TCP), mpirun with 4 MiB socket buffers, and horovodrun --gloo; bus bandwidth as
             a fraction of the link rate.
  nodes      2, 3 and 4 nodes x 1 rank at 1 Gbit/s, Gloo: the points the scaling model
             (benchmarks/scaling_model.py) is checked against.
  train      2 nodes x 1 rank at 1 Gbit/s, Gloo, `hvd-yolo bench train` yolov3-tiny 320:
             fp32 vs fp16, overlap on/off, accumulate 1 vs 4; and 1 rank alone (efficiency).
  comm       the same 2 nodes at --comm-link (1 Gbit/s): synchronous fp16 vs PowerSGD rank 4 vs
             local SGD k=4 (8 timed steps: two averages), and 1 rank alone; bytes per step as
             counted. --comm-model/--comm-size/--comm-batch pick the network (default
             yolov3-tiny 320, batch 8; `yolov3 416 2` for the full model); --comm-shm adds
             each mode on 2 ranks of this machine over Open MPI's shared memory (shm_*).
  mpi        `hvd-yolo bench allreduce` under launch.mpirun_argv's line per Open MPI TCP setting
             (--mpi-configs: Open MPI's defaults, the package's line, btl_tcp_links 2/4/8, ring, ...)
             on --mpi-cases NODESxRATE; the link fraction at 4, 16 (and 64) MiB.
  tbf        how closely the tbf-limited links hold 10-1000 Mbit/s: raw TCP, one way and both
             ways at once, bytes counted by the receiving interface.
  --regime h100:10gbit sets the comm section's link from an emulated GPU regime
  (hvd_yolo/regime.py); --comm-launcher mpi runs it under the package's mpirun line;
  --comm-pin puts each node's rank on one core, as a real node has its own (more nodes than
  cores: the baseline's ranks are pinned the same way).
Every configuration runs in each of --rounds rounds, in alternating order (A B A B ...);
reported values are medians over rounds. Writes benchmarks/results/cluster/cluster.json.
Skipped, with the reason, where a cluster cannot be built (not root, no sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvd_yolo import cluster  # noqa: E402
from hvd_yolo.launch import hvd_yolo_argv, mpirun_argv  # noqa: E402

VENV_BIN = Path(sys.executable).parent
NAME, SUBNET = "bench", "198.18.6.0/24"
SPEC = cluster.Spec(name=NAME, subnet=SUBNET)  # for addresses
SOCKBUF = ["--mca", "btl_tcp_sndbuf", "4194304", "--mca", "btl_tcp_rcvbuf", "4194304"]
SIZES_KIB = (64, 256, 1024, 4096, 16384, 65536)
# Horovod's negotiation cycle for the allreduce runs: the CPU default (10 ms) would add up to
# 10 ms to every single call and hide the per-hop latency the model fits (training keeps 10).
CYCLE_MS = 0.5


# The Open MPI transport settings compared by the mpi section: name -> mpirun_argv's TCP
# options. "openmpi" is Open MPI's own defaults (one connection per peer pair, one put for
# all of a large message); "line" is launch.TCP_MCA, the package's line; "_poll": without
# mpi_yield_when_idle (Open MPI busy-polls, as on GPU nodes).
RING = ["--mca", "coll_tuned_use_dynamic_rules", "1", "--mca", "coll_tuned_allreduce_algorithm", "4"]
MPI_CONFIGS: dict[str, dict[str, Any]] = {
    "openmpi": {"tcp_mca": {}},
    "line": {},
    "links2": {"tcp_mca": {}, "tcp_links": 2},
    "links4": {"tcp_mca": {}, "tcp_links": 4},
    "links8": {"tcp_mca": {}, "tcp_links": 8},
    "links4_ring": {"tcp_mca": {}, "tcp_links": 4, "extra": RING},
    "line_ring": {"extra": RING},
    "links4_sockbuf": {"tcp_mca": {}, "tcp_links": 4, "extra": SOCKBUF},
    "openmpi_poll": {"tcp_mca": {}},
    "line_poll": {},
}


CORES = os.cpu_count() or 1  # this machine's, which every simulated node shares
# a rank's core with --comm-pin: its rank (mpirun's or horovodrun's) mod this machine's cores
RANK_CORE = f"${{OMPI_COMM_WORLD_RANK:-${{HOROVOD_RANK:-0}}}} % {CORES}"


def pinned(argv: list[str], core: str) -> list[str]:
    """``argv`` on one core (taskset): ``core`` is a shell arithmetic expression."""
    return ["sh", "-c", f'exec taskset -c "$(({core}))" "$@"', "sh", *argv]


def job_argv(launcher: str, np: int, hosts: str, args: list[str],
             pin: bool = False) -> list[str]:
    """``hvd-yolo ARGS`` on ``np`` ranks of the cluster, launched from its login node.

    ``launcher``: ``gloo`` (horovodrun --gloo), ``mpi`` (the default mpirun line),
    ``mpi-sockbuf``, or ``mpi:CONFIG`` with CONFIG a key of :data:`MPI_CONFIGS`. ``pin``:
    rank r on core r mod this machine's cores, as :func:`single_on_every_node` pins node r+1."""
    if launcher == "gloo":
        inner = [str(VENV_BIN / "horovodrun"), "--gloo", "-np", str(np), "-H", hosts,
                 "--network-interfaces", cluster.IFACE, "--start-timeout", "60"]
    elif launcher.startswith("mpi:"):
        inner = mpirun_argv(np, hosts=hosts, network=SUBNET, gpu=launcher.endswith("_poll"),
                            **MPI_CONFIGS[launcher[4:]])
    else:
        inner = mpirun_argv(np, hosts=hosts, network=SUBNET,
                            extra=SOCKBUF if launcher == "mpi-sockbuf" else None)
    app = hvd_yolo_argv(*args)
    if pin:
        app = pinned(app, RANK_CORE)
    return cluster.exec_argv(NAME, inner + app)


def run(argv: list[str], timeout: float, log: Path) -> int:
    """Run with a timeout (the whole process group is killed at the end); output to ``log``."""
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
    if rc != 0:
        print(f"  FAILED (rc {rc}): {' '.join(argv)}\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-15:]), flush=True)
    return rc


def hosts_of(nodes: int) -> str:
    return ",".join(f"{cluster.hostname(NAME, k)}:1" for k in range(1, nodes + 1))


def allreduce_round(launcher: str, nodes: int, sizes: tuple[int, ...], work: Path,
                    tag: str, min_iterations: int = 5,
                    seconds: float = 2.0) -> dict[str, float] | None:
    """One ``bench allreduce`` run: {size in bytes: median seconds} (None if it failed)."""
    out = work / f"{tag}.json"
    args = ["bench", "allreduce", "--models", "", "--dtypes", "fp32", "--threads", "1",
            "--sizes-kib", ",".join(map(str, sizes)), "--seconds-per-case", str(seconds),
            "--min-iterations", str(min_iterations), "--warmup", "1",
            "--cycle-time-ms", str(CYCLE_MS), "--json", str(out)]
    rc = run(job_argv(launcher, nodes, hosts_of(nodes), args), 600, work / f"{tag}.log")
    if rc != 0 or not out.exists():
        return None
    cases = json.loads(out.read_text())["cases"]
    return {str(c["bytes"]): c["time_median_s"] for c in cases}


def median_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(r) for r in rounds)) if rounds else set()
    return {k: statistics.median(r[k] for r in rounds) for k in sorted(keys, key=int)}


def section_allreduce(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = (1024, 16384) if args.quick else SIZES_KIB
    result: dict[str, Any] = {}
    for rate in ("1gbit", "10gbit"):
        bring_up(2, rate)
        launchers = ("mpi", "mpi-sockbuf", "gloo")
        per: dict[str, list[dict[str, float]]] = {k: [] for k in launchers}
        for r in range(args.rounds):
            for launcher in launchers if r % 2 == 0 else launchers[::-1]:
                got = allreduce_round(launcher, 2, sizes, work, f"ar_{rate}_{launcher}_r{r}")
                if got:
                    per[launcher].append(got)
                print(f"  allreduce {rate} {launcher} round {r}: {got}", flush=True)
        bps = cluster.rate_bps(rate)
        result[rate] = {k: bus_table(median_rounds(v), 2, bps, len(v)) for k, v in per.items()}
        cluster.down(NAME)
    return result


def bus_table(times: dict[str, float], n: int, bps: float, rounds: int) -> dict[str, Any]:
    """Per size: median time, bus bandwidth (bytes x 2(n-1)/n / t), its fraction of the link."""
    rows = {}
    for size, t in times.items():
        bus = int(size) * 2 * (n - 1) / n / t
        rows[size] = {"time_s": t, "busbw_Gbps": bus * 8 / 1e9, "link_fraction": bus * 8 / bps}
    return {"rounds": rounds, "sizes": rows}


def section_mpi(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Horovod's allreduce under mpirun, per Open MPI transport setting, on ``--mpi-cases``
    (NODESxRATE); the link fraction per size. Slow links (< 100 Mbit/s) skip 64 MiB."""
    configs = args.mpi_configs.split(",")
    result: dict[str, Any] = {}
    for case in args.mpi_cases.split(","):
        nodes, rate = int(case.split("x")[0]), case.split("x")[1]
        bps = cluster.rate_bps(rate)
        sizes = (4096, 16384) if bps < 1e8 or args.quick else (4096, 16384, 65536)
        bring_up(nodes, rate)
        load = os.getloadavg()
        per: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for cfg in configs if r % 2 == 0 else configs[::-1]:
                got = allreduce_round(f"mpi:{cfg}", nodes, sizes, work, f"mpi_{case}_{cfg}_r{r}",
                                      min_iterations=3 if bps < 1e8 else 5,
                                      seconds=1.0 if bps < 1e8 else 2.0)
                if got:
                    per[cfg].append(got)
                fr = {int(k) >> 20: round(int(k) * 2 * (nodes - 1) / nodes * 8 / v / bps, 3)
                      for k, v in (got or {}).items()}
                print(f"  mpi {case} {cfg} round {r}: link fraction per MiB {fr}", flush=True)
        result[case] = {k: bus_table(median_rounds(v), nodes, bps, len(v)) for k, v in per.items()}
        result[case]["load_before"] = load
        result[case]["load_after"] = os.getloadavg()
        cluster.down(NAME)
    return result


SINK = ("import socket,sys\ns=socket.create_server((sys.argv[1],int(sys.argv[2])))\n"
        "while True:\n c,_=s.accept()\n while c.recv(1<<20):\n  pass\n c.close()\n")
SOURCE = ("import socket,sys,time\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
          "b=bytes(1<<16)\nend=time.time()+float(sys.argv[3])\n"
          "while time.time()<end:\n c.sendall(b)\nc.close()\n")
TBF_RATES_MBIT = (10, 25, 50, 100, 200, 300, 1000)


def tbf_probe(rate_mbit: float, seconds: float, both: bool) -> dict[str, float]:
    """TCP from node 1 to node 2 (``both``: and back at once) for ``seconds`` through the
    tbf-limited links; the bytes the receivers' interfaces counted (Ethernet frames, what tbf
    meters) over the middle of the transfer, as a fraction of the set rate."""
    procs = []
    flows = [(1, 2), (2, 1)] if both else [(1, 2)]
    try:
        for _, dst in flows:
            procs.append(subprocess.Popen(cluster.exec_argv(NAME, [
                sys.executable, "-c", SINK, cluster.address(SPEC, dst), "5201"], dst)))
        time.sleep(1.0)
        for src, dst in flows:
            procs.append(subprocess.Popen(cluster.exec_argv(NAME, [
                sys.executable, "-c", SOURCE, cluster.address(SPEC, dst), "5201", str(seconds)],
                src)))
        time.sleep(1.5)  # slow start and the tbf bucket's first burst are left out
        t0, before = time.monotonic(), {d: cluster.interface_bytes(NAME, d)["rx"] for _, d in flows}
        time.sleep(seconds - 2.5)
        t1, after = time.monotonic(), {d: cluster.interface_bytes(NAME, d)["rx"] for _, d in flows}
    finally:
        for proc in procs[::-1]:  # sources first: a sink gone first resets their connection
            proc.kill()
            proc.wait()
    fr = {f"{s}->{d}": (after[d] - before[d]) * 8 / (t1 - t0) / (rate_mbit * 1e6)
          for s, d in flows}
    return fr


def section_tbf(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """How closely tbf holds the set rate, 10-300 Mbit/s, one way and both ways at once."""
    result: dict[str, Any] = {"load_before": os.getloadavg()}
    seconds = 4.0 if args.quick else 6.0
    for rate in TBF_RATES_MBIT:
        bring_up(2, f"{rate}mbit")
        row: dict[str, Any] = {}
        for r in range(args.rounds):
            for both in (False, True) if r % 2 == 0 else (True, False):
                got = tbf_probe(rate, seconds, both)
                row.setdefault("both" if both else "one", []).append(got)
                print(f"  tbf {rate} Mbit/s {'both ways' if both else 'one way'} round {r}: "
                      f"{got}", flush=True)
        result[str(rate)] = {
            "one_way": statistics.median(x["1->2"] for x in row["one"]),
            "both_ways": statistics.median(min(x.values()) for x in row["both"]),
            "rounds": row}
        cluster.down(NAME)
    result["load_after"] = os.getloadavg()
    return result


def section_nodes(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = (1024, 16384) if args.quick else (256, 1024, 4096, 16384, 65536)
    bring_up(4, "1gbit")
    per: dict[int, list[dict[str, float]]] = {n: [] for n in (2, 3, 4)}
    for r in range(args.rounds):
        for n in (2, 3, 4) if r % 2 == 0 else (4, 3, 2):
            got = allreduce_round("gloo", n, sizes, work, f"nodes{n}_r{r}")
            if got:
                per[n].append(got)
            print(f"  nodes {n} round {r}: {got}", flush=True)
    cluster.down(NAME)
    return {str(n): bus_table(median_rounds(v), n, 1e9, len(v)) for n, v in per.items()}


TRAIN_CONFIGS = {  # name -> bench train options
    "fp32_overlap_acc1": ["--compression", "none", "--overlap", "on", "--accumulate", "1"],
    "fp16_overlap_acc1": ["--compression", "fp16", "--overlap", "on", "--accumulate", "1"],
    "fp32_nooverlap_acc1": ["--compression", "none", "--overlap", "off", "--accumulate", "1"],
    "fp16_nooverlap_acc1": ["--compression", "fp16", "--overlap", "off", "--accumulate", "1"],
    "fp32_overlap_acc4": ["--compression", "none", "--overlap", "on", "--accumulate", "4"],
}
KEEP = ("img_per_sec_total", "step_time_mean_s", "compute_time_mean_s", "allreduce_wait_mean_s",
        "allreduce_bytes_per_step", "batch", "accumulate", "world_size")


def section_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bring_up(2, "1gbit")
    common = ["bench", "train", "--model", "yolov3-tiny", "--size", "320", "--batch-size", "8",
              "--threads", "1", "--iterations", "3" if args.quick else "6", "--warmup", "2",
              "--quiet"]
    result = alternate_rounds("train", TRAIN_CONFIGS, common, args.rounds, work)
    cluster.down(NAME)
    return result


def alternate_rounds(section: str, configs: dict[str, list[str]], common: list[str],
                     rounds: int, work: Path, launcher: str = "gloo",
                     nodes: int = 2, pin: bool = False) -> dict[str, Any]:
    """``bench train`` (``common``) once alone on one node ("single": the efficiency baseline)
    and once per config on ``nodes`` nodes, in alternating order for ``rounds`` rounds; the
    medians of ``KEEP`` per config, with each round's img/s. With more nodes than this
    machine's cores the baseline is one rank on every node at once, nothing sent (a rank's
    speed when the ranks share the cores as in the run): "single" is their mean. ``pin``: each
    node's rank on one core, the same cores in the baseline and in the configs."""
    names = ["single", *configs]
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    shared = nodes > CORES
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out = work / f"{section}_{name}_r{r}.json"
            if name == "single" and shared:
                rec = single_on_every_node(common, nodes, work / f"{section}_single_r{r}", pin)
                if rec:
                    per[name].append(rec)
                print(f"  {section} single ({nodes} at once) round {r}: "
                      f"{rec['img_per_sec_total'] if rec else 'failed'}", flush=True)
                continue
            if name == "single":  # one rank on one node (no link)
                argv = cluster.exec_argv(NAME, hvd_yolo_argv(*common, "--json", str(out)), 1)
            elif name.startswith("shm_"):  # 2 ranks of this machine: shared memory, no link
                argv = mpirun_argv(2) + hvd_yolo_argv(*common, *configs[name], "--json", str(out))
            else:
                argv = job_argv(launcher, nodes, hosts_of(nodes),
                                [*common, *configs[name], "--json", str(out)], pin)
            rc = run(argv, 900, work / f"{section}_{name}_r{r}.log")
            if rc == 0 and out.exists():
                rec = json.loads(out.read_text())
                per[name].append({k: rec.get(k) for k in KEEP})
            print(f"  {section} {name} round {r}: rc {rc} "
                  f"{per[name][-1]['img_per_sec_total'] if per[name] else ''}", flush=True)
    result: dict[str, Any] = {}
    for name, recs in per.items():
        if recs:
            result[name] = {k: statistics.median(rec[k] for rec in recs) for k in KEEP
                            if recs[0].get(k) is not None}
            result[name]["rounds"] = len(recs)
            result[name]["img_per_sec_rounds"] = [rec["img_per_sec_total"] for rec in recs]
    return result


def single_on_every_node(common: list[str], nodes: int, stem: Path,
                         pin: bool = False) -> dict[str, Any] | None:
    """``bench train`` as one rank on each of ``nodes`` nodes at once (no collective between
    them): ``KEEP`` of one rank, img/s the mean over the nodes; None if one failed. ``pin``:
    node k's rank on core k-1 mod this machine's cores."""
    outs = [Path(f"{stem}_n{k}.json") for k in range(1, nodes + 1)]
    apps = [hvd_yolo_argv(*common, "--json", str(out)) for out in outs]
    if pin:
        apps = [pinned(app, str(k % CORES)) for k, app in enumerate(apps)]
    argvs = [cluster.exec_argv(NAME, app, k) for k, app in enumerate(apps, start=1)]
    logs = [out.with_suffix(".log") for out in outs]
    with ThreadPoolExecutor(nodes) as pool:  # run() waits: one thread per node, all at once
        rcs = list(pool.map(run, argvs, [900] * nodes, logs))
    if any(rc != 0 or not out.exists() for rc, out in zip(rcs, outs)):
        return None
    recs = [json.loads(out.read_text()) for out in outs]
    rec = {k: recs[0].get(k) for k in KEEP}
    rec["img_per_sec_total"] = statistics.mean(x["img_per_sec_total"] for x in recs)
    return rec


COMM_CONFIGS = {  # name -> bench train options (section comm)
    "fp32_sync": ["--compression", "none"],
    "fp16_sync": ["--compression", "fp16"],
    "powersgd_r4": ["--compression", "powersgd", "--powersgd-rank", "4"],
    "local_k4": ["--compression", "fp16", "--sync", "local", "--local-steps", "4"],
    # timed from the second period: each times one landing and one sending per period
    "local_k4_overlap": ["--compression", "fp16", "--sync", "local", "--local-steps", "4",
                         "--local-overlap", "--warmup", "4", "--iterations", "8"],
}


def section_comm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Synchronisation modes at ``--comm-link`` (or ``--regime``'s rate) on ``--comm-nodes``:
    img/s, efficiency against one rank alone, bytes per step."""
    regime_plan = None
    if args.regime:
        from hvd_yolo import regime

        regime_plan = regime.plan_link(args.regime, args.comm_model, args.comm_size,
                                       args.comm_batch, args.host_img_s)
        args.comm_link = regime_plan["link"]
        print(f"  regime {args.regime}: link {args.comm_link} ({regime_plan})", flush=True)
    bring_up(args.comm_nodes, args.comm_link)
    load = os.getloadavg()
    common = ["bench", "train", "--model", args.comm_model, "--size", str(args.comm_size),
              "--batch-size", str(args.comm_batch), "--threads", "1",
              "--iterations", str(args.comm_iterations or (4 if args.quick else 8)),
              "--warmup", "2", "--quiet"]
    chosen = {k: v for k, v in COMM_CONFIGS.items()
              if not args.comm_configs or k in args.comm_configs.split(",")}
    configs = {**chosen, **({f"shm_{k}": v for k, v in chosen.items()} if args.comm_shm else {})}
    result = alternate_rounds("comm", configs, common, args.rounds, work, args.comm_launcher,
                              args.comm_nodes, args.comm_pin)
    cluster.down(NAME)
    result.update(link=args.comm_link, model=args.comm_model, size=args.comm_size,
                  batch=args.comm_batch, nodes=args.comm_nodes, launcher=args.comm_launcher,
                  pinned=args.comm_pin,
                  mpi_config="line" if args.comm_launcher == "mpi" else None,
                  regime=regime_plan, load_before=load, load_after=os.getloadavg())
    if "single" in result:
        for name in configs:
            if name in result:
                ranks = 2 if name.startswith("shm_") else args.comm_nodes
                result[name]["efficiency"] = (result[name]["img_per_sec_total"]
                                              / (ranks * result["single"]["img_per_sec_total"]))
    return result


def bring_up(nodes: int, rate: str) -> None:
    cluster.down(NAME)
    cluster.up(cluster.Spec(name=NAME, nodes=nodes, link=rate, subnet=SUBNET))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sections", default="allreduce,nodes,train")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--comm-link", default="1gbit", help="the comm section's link rate (tc)")
    p.add_argument("--comm-model", default="yolov3-tiny", help="the comm section's network")
    p.add_argument("--comm-size", type=int, default=320, help="the comm section's input size")
    p.add_argument("--comm-batch", type=int, default=8, help="the comm section's batch per rank")
    p.add_argument("--comm-iterations", type=int, default=0,
                   help="the comm section's timed steps (default 8, 4 with --quick)")
    p.add_argument("--comm-nodes", type=int, default=2, help="the comm section's nodes")
    p.add_argument("--comm-launcher", choices=("gloo", "mpi"), default="gloo",
                   help="the comm section's launcher (mpi: launch.mpirun_argv's line)")
    p.add_argument("--comm-configs", default="",
                   help="the comm section's modes (keys of COMM_CONFIGS; default all)")
    p.add_argument("--regime", default=None,
                   help="the comm section's link from an emulated regime, e.g. h100:10gbit "
                        "(hvd_yolo/regime.py; overrides --comm-link)")
    p.add_argument("--host-img-s", type=float, default=None,
                   help="--regime: one rank's img/s here if known (default: measured)")
    p.add_argument("--comm-pin", action="store_true",
                   help="each node's rank on one core (taskset, node k on core k-1 mod the "
                        "cores): with more nodes than cores, the kernel otherwise may run 3 "
                        "ranks on one core and 1 on the other, and every collective waits for "
                        "the slowest")
    p.add_argument("--comm-shm", action="store_true",
                   help="the comm section also on 2 ranks of this machine (shared memory)")
    p.add_argument("--mpi-cases", default="2x1gbit,4x1gbit,2x25mbit,4x25mbit",
                   help="the mpi section's NODESxRATE cases")
    p.add_argument("--mpi-configs", default="openmpi,links4,line",
                   help="the mpi section's transport settings (keys of MPI_CONFIGS)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = cluster.missing_requirements()
    if missing:
        print("cluster benchmarks skipped: no simulated cluster here, missing: "
              + "; ".join(missing))
        return 0
    path = out / "cluster.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(machine={"platform": platform.platform(), "cores": os.cpu_count(),
                           "load_before": os.getloadavg()},
                  created=time.strftime("%Y-%m-%d %H:%M:%S %Z"), rounds=args.rounds,
                  command=" ".join(["benchmarks/cluster_bench.py", *(argv or sys.argv[1:])]))
    sections = {"allreduce": section_allreduce, "nodes": section_nodes, "train": section_train,
                "comm": section_comm, "mpi": section_mpi, "tbf": section_tbf}
    with tempfile.TemporaryDirectory(prefix="hvd_cluster_bench_") as tmp:
        try:
            for name in args.sections.split(","):
                print(f"[cluster] {name}", flush=True)
                got = sections[name](args, Path(tmp))
                if name in ("mpi", "tbf"):  # cases of separate runs add up
                    record.setdefault(name, {}).update(got)
                else:
                    record[name] = got
                path.write_text(json.dumps(record, indent=1) + "\n")
        finally:
            cluster.down(NAME)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
