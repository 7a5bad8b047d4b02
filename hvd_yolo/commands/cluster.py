"""`hvd-yolo cluster up|status|down|exec|kill|start`: a simulated multi-node cluster on this machine.

Rehearse a multi-node launch before you have a cluster: ``up`` makes N nodes (network
namespaces with their own hostname, address, sshd and a rate-limited link), ``exec`` runs a
command on the login node (e.g. ``mpi/mpirun.sh --hostfile ...``), ``kill`` makes a node
die (``start`` brings it back), ``down`` removes everything. Needs root (CAP_NET_ADMIN),
iproute2 and openssh-server.
"""

from __future__ import annotations

import argparse
import os

from hvd_yolo import cluster
from hvd_yolo.cli import UsageError, write_json

EPILOG = """example:
  hvd-yolo cluster up --nodes 2 --link 1gbit
  hvd-yolo cluster exec -- mpi/mpirun.sh --hostfile /run/hvd-yolo-cluster/sim/hostfile \\
      --network 198.18.0.0/24 train --config cfg.yaml
  hvd-yolo cluster down"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="create the nodes, links and sshds; write the hostfile")
    up.add_argument("--nodes", type=int, default=2, help="nodes (default 2)")
    up.add_argument("--link", default=None,
                    help="rate of each node's link, tc units: 1gbit, 500mbit (default 10gbit)")
    up.add_argument("--regime", default=None, metavar="ACCEL:RATE",
                    help="emulate a GPU cluster, e.g. h100:10gbit: the link is RATE x (this "
                         "machine's img/s / the accelerator's) for --model/--size/--batch-size "
                         "(instead of --link; table and sources: hvd_yolo/regime.py)")
    up.add_argument("--model", default="yolov3-tiny", help="--regime: the model (yolov3-tiny)")
    up.add_argument("--size", type=int, default=320, help="--regime: input size (320)")
    up.add_argument("--batch-size", type=int, default=8, help="--regime: batch per rank (8)")
    up.add_argument("--host-img-s", type=float, default=None,
                    help="--regime: this machine's img/s for one rank, if already measured "
                         "(default: measure it with hvd-yolo bench train)")
    up.add_argument("--latency-ms", type=float, default=0.0,
                    help="one-way delay added per link (needs the kernel's netem qdisc)")
    up.add_argument("--slots", type=int, default=1, help="ranks per node in the hostfile")
    up.add_argument("--subnet", default="198.18.0.0/24",
                    help="the nodes' subnet, inside 198.18.0.0/15 (default 198.18.0.0/24)")
    for name, text in (("status", "show the nodes, their links and daemons"),
                       ("down", "remove the cluster: processes, namespaces, links, files"),
                       ("exec", "run a command on the login node (or --node K)"),
                       ("kill", "kill every process of node K: a node failure"),
                       ("start", "bring a killed node K back (restart its sshd)")):
        p = sub.add_parser(name, help=text)
        if name == "status":
            p.add_argument("--json", metavar="PATH", help="also write the status as JSON ('-': stdout only)")
        if name == "exec":
            p.add_argument("--node", default=cluster.LOGIN, help="login (default) or 1..N")
            p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
        if name in ("kill", "start"):
            p.add_argument("node", help="node number 1..N")
    for p in sub.choices.values():
        p.add_argument("--name", default="sim", help="cluster name (default sim)")


def run(args: argparse.Namespace) -> int:
    try:
        return ACTIONS[args.action](args)
    except cluster.ClusterError as exc:
        raise UsageError(str(exc)) from None


def _up(args: argparse.Namespace) -> int:
    link, plan = args.link or "10gbit", None
    if args.regime:
        from hvd_yolo import regime

        if args.link:
            raise UsageError("give --link or --regime, not both")
        try:
            plan = regime.plan_link(args.regime, args.model, args.size, args.batch_size,
                                    args.host_img_s)
        except regime.RegimeError as exc:
            raise UsageError(str(exc)) from None
        link = plan["link"]
    spec = cluster.Spec(name=args.name, nodes=args.nodes, link=link, slots=args.slots,
                        subnet=args.subnet, latency_ms=args.latency_ms)
    info = cluster.up(spec, regime=plan)
    if plan:
        print(f"regime {plan['regime']}: {plan['model']} {plan['size']} px batch "
              f"{plan['batch']}: {plan['host_img_s']:.3g} img/s per rank here "
              f"({'measured' if plan['host_img_s_measured'] else 'given'}) vs "
              f"{plan['accelerator_img_s']:.0f} on {args.regime.split(':')[0]} "
              f"({plan['compute_ratio']:.0f}x): link {plan['link']}")
    print(f"cluster {spec.name}: {spec.nodes} nodes x {spec.slots} slots, {spec.link} links, "
          f"subnet {spec.subnet} (interface {info['iface']})")
    for host, node in info["nodes"].items():
        print(f"  {host:<12} {node['address']:<15} netns {node['netns']}")
    print(f"hostfile: {info['hostfile']}\nrun jobs from the login node, e.g.:\n"
          f"  hvd-yolo cluster exec --name {spec.name} -- mpi/mpirun.sh --hostfile "
          f"{info['hostfile']} --network {spec.subnet} train --config cfg.yaml\n"
          f"  hvd-yolo cluster exec --name {spec.name} -- mpi/horovodrun.sh --gloo "
          f"--hostfile {info['hostfile']} --network {info['iface']} -np "
          f"{spec.nodes * spec.slots} train --config cfg.yaml\n"
          f"take it down: hvd-yolo cluster down --name {spec.name}")
    return 0


def _status(args: argparse.Namespace) -> int:
    info = cluster.status(args.name)
    write_json(args.json, info)
    if args.json == "-":
        pass
    elif not info["up"]:
        print(f"cluster {args.name}: down")
    else:
        spec = info.get("spec", {})
        print(f"cluster {args.name}: up, {spec.get('link', '?')} links, hostfile "
              f"{info.get('hostfile', '?')}")
        for host, node in info.get("nodes", {}).items():
            state = "up" if node["up"] else "DOWN (no processes)"
            print(f"  {host:<12} {node['address']:<15} {state:<20} {node['qdisc']}")
    return 0 if info["up"] else 1


def _down(args: argparse.Namespace) -> int:
    removed = cluster.down(args.name)
    print(f"cluster {args.name}: " + (f"removed {len(removed)} items" if removed
                                      else "nothing to remove"))
    return 0


def _exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise cluster.ClusterError("no command given: hvd-yolo cluster exec -- COMMAND ...")
    if not cluster.list_namespaces(args.name):
        raise cluster.ClusterError(f"cluster {args.name!r} is not up (hvd-yolo cluster up)")
    full = cluster.exec_argv(args.name, argv, args.node)
    os.execvp(full[0], full)
    return 0  # not reached


def _kill(args: argparse.Namespace) -> int:
    if cluster.netns(args.name, args.node) not in cluster.list_namespaces(args.name):
        raise cluster.ClusterError(f"cluster {args.name!r} has no node {args.node!r}")
    pids = cluster.kill_node(args.name, args.node)
    print(f"node {cluster.hostname(args.name, args.node)}: killed {len(pids)} processes")
    return 0


def _start(args: argparse.Namespace) -> int:
    if not args.node.isdigit():
        raise cluster.ClusterError(f"node must be a number 1..N, got {args.node!r}")
    cluster.start_node(args.name, int(args.node))
    print(f"node {cluster.hostname(args.name, args.node)}: up")
    return 0


ACTIONS = {"up": _up, "status": _status, "down": _down, "exec": _exec, "kill": _kill,
           "start": _start}
