#!/usr/bin/env python
"""The scaling model (hvd_yolo.scaling) checked two ways, and its projection for YOLOv3 on H100s.

    .venv/bin/python benchmarks/scaling_model.py   # reads/writes benchmarks/results/cluster/

Inputs, each measured: ``plan_*.json`` (``hvd-yolo plan`` on the simulated cluster: per-hop
latency, per-round overhead, link bytes/s, overlap, compute and forward share) and
``cluster.json`` (made by benchmarks/cluster_bench.py: the img/s of every mode at the emulated
rate). Checks:
  (a) the model, fed the plan's measurements, against the measured img/s of each mode;
  (b) the model against Horovod's published 512-GPU benchmark (128 servers x 4 P100, 25 Gbit/s
      RoCE: ResNet-101 and Inception V3 ~0.90, VGG-16 0.68), with the P100's published
      per-GPU img/s, the networks' parameter counts (torchvision), their forward share
      measured here, and the overlap measured here.
Then the projection: YOLOv3 416 on H100s (254 img/s per GPU, benchmarks/results/
gpu_check_h100.txt), 8-512 nodes, 10/25/100 Gbit/s, per mode. The alpha-beta fit of a size
sweep (fit, ring_time) is kept for the allreduce sweeps of cluster_bench's nodes section.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvd_yolo import scaling  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cluster"
NODES = (8, 16, 32, 64, 128, 256, 512)
LINKS_GBPS = (10, 25, 100)
# Per-hop latency of a GPU cluster's ring (NCCL over RoCE/InfiniBand): not measurable here; the
# simulated links' own alpha (namespaces + CPU ranks) is measured by plan and reported beside.
ALPHA_GPU_S = 10e-6
HOROVOD_GPU_CYCLE_S = 1e-3 / 2  # Horovod's GPU cycle time (1 ms): half a cycle's wait per round
H100_IMG_S, H100_BATCH = 254.0, 32  # gpu_check_h100.txt, bench.yolov3.fp16 (AMP)
YOLOV3_PARAMS = 61_949_149
YOLOV3_POWERSGD_BYTES = 2.24e6  # benchmarks/results/comm_bytes_yolov3.json, rank 4
# Horovod's benchmark (docs/benchmarks.rst of horovod/horovod: "128 servers with 4 Pascal GPUs
# each connected by a RoCE-capable 25 Gbit/s network ... 90% scaling efficiency for both
# Inception V3 and ResNet-101, and 68% scaling efficiency for VGG-16"), batch 64 per GPU,
# fp32 gradients, Horovod's 2018 defaults (64 MiB fusion, 5 ms cycle), NCCL ring over all GPUs.
# Per-GPU img/s of a P100 with tf_cnn_benchmarks, batch 64, synthetic data: TensorFlow's
# published benchmarks (tensorflow/docs site/en/r1/guide/performance/benchmarks.md, DGX-1
# P100: InceptionV3 142, VGG16 154); ResNet-101 is not in that table: 1656.82 img/s on 16 GPUs
# in the output shown on Horovod's benchmark page, 103.6 per GPU.
HOROVOD_BENCH = {
    "resnet101": {"img_s": 103.6, "published": 0.90, "size": 224},
    "inception_v3": {"img_s": 142.0, "published": 0.90, "size": 299},
    "vgg16": {"img_s": 154.0, "published": 0.68, "size": 224},
}
HOROVOD_BENCH_SOURCE = (
    "https://github.com/horovod/horovod/blob/master/docs/benchmarks.rst; "
    "https://github.com/tensorflow/docs/blob/master/site/en/r1/guide/performance/benchmarks.md")


# The link fraction when cluster.json has no mpi section: mpi4py's MPI_Allreduce, 2 simulated
# nodes at 25 Mbit/s, 16 MiB, one TCP connection per pair with 128 KiB put fragments.
MPI_LINK_FRACTION = 0.90


def train_overlap(record: dict) -> float:
    """The share of the fp32 allreduce that overlap hid in cluster.json's train section."""
    train = record.get("train", {})
    on, off = train.get("fp32_overlap_acc1"), train.get("fp32_nooverlap_acc1")
    if on and off and off["allreduce_wait_mean_s"] > 0:
        return scaling.overlap_of(on["allreduce_wait_mean_s"], off["allreduce_wait_mean_s"])
    return 0.6


def train_contention(record: dict) -> float:
    """How much compute slowed per second of allreduce in flight beside it, from the same two
    runs as :func:`train_overlap`: (compute with overlap - compute without) / the allreduce's
    time beside backward (its wait without overlap, at most backward: 2/3 of compute)."""
    train = record.get("train", {})
    on, off = train.get("fp32_overlap_acc1"), train.get("fp32_nooverlap_acc1")
    if not (on and off):
        return 0.0
    return scaling.contention_of(on["compute_time_mean_s"], off["compute_time_mean_s"],
                                 off["allreduce_wait_mean_s"], off["compute_time_mean_s"] * 2 / 3)


def ring_time(n: int, nbytes: float, alpha: float, bw: float) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw


def fit(points: list[tuple[int, float, float]]) -> tuple[float, float]:
    """alpha (s) and B (bytes/s) from (n, bytes, seconds), minimising the relative error."""
    a = np.array([[2 * (n - 1), 2 * (n - 1) / n * s] for n, s, _ in points])
    t = np.array([t for _, _, t in points])
    (alpha, inv_b), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return float(alpha), float(1 / inv_b)


def torchvision_net(name: str) -> tuple[int, float]:
    """(parameters, forward share of forward + backward) of a torchvision network, measured
    here on one CPU thread at batch 2 (median of 3)."""
    import torch
    import torchvision.models as tvm

    torch.set_num_threads(1)
    net = {"resnet101": lambda: tvm.resnet101(),
           "inception_v3": lambda: tvm.inception_v3(aux_logits=False, init_weights=False),
           "vgg16": lambda: tvm.vgg16()}[name]()
    size = HOROVOD_BENCH[name]["size"]
    x = torch.rand(2, 3, size, size)
    shares = []
    for _ in range(4):
        t0 = time.perf_counter()
        loss = net(x).square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        shares.append((t1 - t0) / (t2 - t0))
        net.zero_grad()
    return sum(p.numel() for p in net.parameters()), float(np.median(shares[1:]))


def validate_published(overlap: float, fraction: float) -> list[dict]:
    """Check (b): the model's 512-GPU efficiency against Horovod's published figures."""
    rows = []
    for name, b in HOROVOD_BENCH.items():
        params, fwd = torchvision_net(name)
        compute = 64 / b["img_s"]
        x = scaling.Inputs(compute_s=compute, backward_s=compute * (1 - fwd), params=params,
                           batch=64, alpha_s=ALPHA_GPU_S, cycle_s=5e-3 / 2,
                           bw=25e9 / 8 * fraction, overlap=overlap, fusion_bytes=64 * 2**20,
                           gpus_per_node=4, intra_bw=10e9)
        eff = scaling.predict(x, 128, ("fp32",))["fp32"]["efficiency"]
        rows.append({"network": name, "params": params, "forward_share": fwd,
                     "p100_img_s": b["img_s"], "published": b["published"], "model": eff,
                     "error": eff - b["published"]})
    return rows


def regime_runs(record: dict) -> dict[str, dict]:
    """cluster.json's runs of every mode at an emulated rate: ``comm_regime*`` sections."""
    return {k: v for k, v in record.items()
            if k.startswith("comm_regime") and isinstance(v, dict) and "single" in v}


def link_fraction(record: dict, launcher: str, nodes: int,
                  mpi_config: str | None) -> float | None:
    """The fraction of the link Horovod's 16 MiB allreduce moved on ``nodes`` nodes, measured
    apart from the training runs: under mpirun, with Open MPI TCP setting ``mpi_config`` at
    25 Mbit/s (mpi section; None: a comm run from before ``mpi_config`` was recorded, which
    used 4 connections per peer pair, ``links4``); under Gloo, the nodes section's sweep at
    1 Gbit/s."""
    if launcher == "mpi":
        v = record.get("mpi", {}).get(f"{nodes}x25mbit", {}).get(mpi_config or "links4", {})
    else:
        v = record.get("nodes", {}).get(str(nodes), {})
    return v.get("sizes", {}).get(str(16 << 20), {}).get("link_fraction")


def model_params(record: dict, comm: dict) -> float:
    """The network's parameter count: half the fp16 bytes per step of the run's fp16 mode, or
    of another regime run of the same model where this one ran without fp16."""
    for run in [comm, *regime_runs(record).values()]:
        if run.get("model") == comm.get("model") and "fp16_sync" in run:
            return run["fp16_sync"]["allreduce_bytes_per_step"] / 2
    raise KeyError(f"no fp16_sync run of {comm.get('model')} in cluster.json")


def local_width(comm: dict, params: float) -> int:
    """Bytes per number of the run's local SGD average (4: fp32 weights, as before the fp16
    change was sent; 2: the fp16 change), from its measured bytes per step (k=4)."""
    local = comm.get("local_k4", {}).get("allreduce_bytes_per_step")
    return 2 if not local else max(2, min(4, round(local * 4 / params)))


def validate_measured(record: dict, overlap: float, contention: float) -> list[dict]:
    """Check (a): the measured img/s per mode of every run at an emulated rate (``comm_regime*``)
    against the model fed with inputs measured apart from them: one rank's compute time (its
    own run in the same rounds; with more nodes than cores, every node's rank at once), the
    link fraction of Horovod's 16 MiB allreduce on as many nodes with the same launcher
    (:func:`link_fraction`), the fp32 overlap share and contention (train section); PowerSGD's
    extra compute per step is its measured compute time minus one rank's."""
    from hvd_yolo.cluster import rate_bps

    rows = []
    for run, comm in regime_runs(record).items():
        nodes = comm.get("nodes", 2)
        frac = link_fraction(record, comm.get("launcher", "gloo"), nodes, comm.get("mpi_config"))
        if frac is None:
            continue
        single = comm["single"]
        params = model_params(record, comm)
        compute = single["compute_time_mean_s"]
        x = scaling.Inputs(compute_s=compute, backward_s=compute * 2 / 3, params=int(params),
                           batch=int(single["batch"]), alpha_s=0.0, cycle_s=5e-3,
                           bw=rate_bps(comm["link"]) / 8 * frac, overlap=overlap,
                           contention=contention,
                           powersgd_bytes=comm.get("powersgd_r4", {}).get(
                               "allreduce_bytes_per_step", 0.0),
                           powersgd_compute_s=max(0.0, comm.get("powersgd_r4", {}).get(
                               "compute_time_mean_s", compute) - compute), local_steps=4,
                           local_width=local_width(comm, params))
        for name, mode in (("fp32_sync", "fp32"), ("fp16_sync", "fp16"),
                           ("powersgd_r4", "powersgd"), ("local_k4", "local"),
                           ("local_k4_overlap", "local_overlap")):
            if name in comm:
                pred = scaling.predict(x, nodes, (mode,))[mode]["img_per_sec"]
                got = comm[name]["img_per_sec_total"]
                rows.append({"run": run, "nodes": nodes, "link": comm["link"],
                             "launcher": comm.get("launcher", "gloo"), "link_fraction": frac,
                             "config": name, "mode": mode, "measured": got, "model": pred,
                             "error": pred / got - 1})
    return rows


def project(plan: dict | None, fraction: float, overlap: float, fwd: float) -> list[dict]:
    """YOLOv3 416, batch 32 per H100, per link rate, node count and mode."""
    compute = H100_BATCH / H100_IMG_S
    cycle = HOROVOD_GPU_CYCLE_S + (plan["measured"]["negotiation_s"] if plan else 0.0)
    base = scaling.Inputs(compute_s=compute, backward_s=compute * (1 - fwd),
                          params=YOLOV3_PARAMS, batch=H100_BATCH, alpha_s=ALPHA_GPU_S,
                          cycle_s=cycle, bw=1.0, overlap=overlap,
                          powersgd_bytes=YOLOV3_POWERSGD_BYTES, local_steps=4)
    rows = []
    for gbps in LINKS_GBPS:
        for n in NODES:
            x = scaling.with_link(base, gbps * 1e9, fraction)
            pred = scaling.predict(x, n, ("fp32", "fp16", "powersgd", "local", "local_overlap"))
            x8 = replace(x, gpus_per_node=8, intra_bw=300e9)
            hier = scaling.predict(x8, n, ("fp16", "fp16_hier"))
            rows.append({"link_Gbps": gbps, "nodes": n,
                         **{m: v["efficiency"] for m, v in pred.items()},
                         "fp16_8gpu_flat": hier["fp16"]["efficiency"],
                         "fp16_8gpu_hier": hier["fp16_hier"]["efficiency"]})
    return rows


def main() -> int:
    record = json.loads((OUT / "cluster.json").read_text()) if (OUT / "cluster.json").exists() \
        else {}
    plans = sorted(OUT.glob("plan_*.json"))
    plan = json.loads(plans[0].read_text()) if plans else None
    overlap = plan["measured"]["overlap"] if plan else train_overlap(record)
    contention = plan["measured"].get("contention", 0.0) if plan else train_contention(record)
    fwd = plan["measured"]["forward_share"] if plan else 1 / 3
    # The link fraction of Horovod's 16 MiB allreduce under the package's mpirun line, 2 nodes
    # at 25 Mbit/s (mpi section): what a transport that keeps both directions busy reaches.
    fraction = link_fraction(record, "mpi", 2, "line") or MPI_LINK_FRACTION
    model = {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "overlap": overlap,
             "contention": contention,
             "link_fraction": fraction, "alpha_gpu_s": ALPHA_GPU_S,
             "published": validate_published(overlap, fraction),
             "measured": validate_measured(record, overlap, contention),
             "projection": project(plan, fraction, overlap, fwd), "plan": plan,
             "sources": HOROVOD_BENCH_SOURCE}
    (OUT / "scaling_model.json").write_text(json.dumps(model, indent=1) + "\n")
    text = measured_markdown(record) + "\n" + markdown(model)
    (OUT / "MODEL.md").write_text(text)
    print(text)
    return 0


def measured_markdown(rec: dict) -> str:
    """cluster.json's tbf, mpi and comm sections as tables."""
    lines = ["# Simulated cluster: links, MPI transport, modes at emulated GPU rates", ""]
    tbf = rec.get("tbf", {})
    if tbf:
        lines += ["## tbf: the rate the namespaces' links hold (`cluster_bench.py --sections tbf`)",
                  "", "TCP through the tbf-limited veth links, node 1 -> node 2 (one way) and "
                  "both ways at once; bytes the receiving interface counted (Ethernet frames, "
                  "what tbf meters; both ways also counts the other flow's ACKs) over the "
                  "middle of a 6 s transfer, as a fraction of the set rate; medians of 3 "
                  f"alternating rounds; load average before {tbf.get('load_before', [0])[0]:.1f}.",
                  "", "| set rate | one way | both ways (slower direction) |", "|---|---|---|"]
        for rate, r in tbf.items():
            if isinstance(r, dict) and "one_way" in r:
                lines.append(f"| {rate} Mbit/s | {r['one_way']:.3f} | {r['both_ways']:.3f} |")
        lines.append("")
    mpi = rec.get("mpi", {})
    if mpi:
        lines += ["## Horovod's allreduce under mpirun, per Open MPI TCP setting", "",
                  "`hvd-yolo bench allreduce` (flat fp32 buffers, cycle 0.5 ms) launched with "
                  "`launch.mpirun_argv` (`btl tcp,self`) from the login node; bus bandwidth "
                  "bytes x 2(n-1)/n / time as a fraction of the link rate; medians of 3 "
                  "alternating rounds.", "",
                  "| nodes x link | setting | 4 MiB | 16 MiB | 64 MiB | load before |",
                  "|---|---|---|---|---|---|"]
        for case, per in mpi.items():
            for cfg, v in per.items():
                if not isinstance(v, dict) or "sizes" not in v:
                    continue
                cells = [f"{v['sizes'][str(k << 20)]['link_fraction']:.2f}"
                         if str(k << 20) in v["sizes"] else "-" for k in (4, 16, 64)]
                lines.append(f"| {case} | {cfg} | " + " | ".join(cells)
                             + f" | {per.get('load_before', ['?'])[0]:.1f} |")
        lines.append("")
    for run, comm in regime_runs(rec).items():
        reg = comm.get("regime") or {}
        lines += [f"## Modes at {reg.get('regime', comm.get('link'))} ({comm.get('link')}), "
                  f"{comm.get('nodes', 2)} nodes, {comm.get('model')} {comm.get('size')} batch "
                  f"{comm.get('batch')}, launcher {comm.get('launcher', 'gloo')} (`{run}`)", "",
                  "| mode | img/s (rounds) | vs fp32 | vs fp16 | efficiency | MB/step |",
                  "|---|---|---|---|---|---|"]
        f32 = comm.get("fp32_sync", {}).get("img_per_sec_total")
        f16 = comm.get("fp16_sync", {}).get("img_per_sec_total")
        for name, r in comm.items():
            if not isinstance(r, dict) or "img_per_sec_total" not in r:
                continue
            rounds = ", ".join(f"{x:.2f}" for x in r["img_per_sec_rounds"]) \
                if "img_per_sec_rounds" in r else "median round"
            v32 = f"{r['img_per_sec_total'] / f32:.2f}" if f32 and name != "single" else ""
            v16 = f"{r['img_per_sec_total'] / f16:.2f}" if f16 and name != "single" else ""
            eff = f"{r['efficiency']:.2f}" if "efficiency" in r else ""
            mb = (r.get("allreduce_bytes_per_step") or 0) / 1e6
            lines.append(f"| {name} | {r['img_per_sec_total']:.2f} ({rounds}) | {v32} | {v16} "
                         f"| {eff} | {mb:.2f} |")
        lines.append("")
    return "\n".join(lines)


def markdown(m: dict) -> str:
    lines = ["# The scaling model: checked, and projected", "",
             "`benchmarks/scaling_model.py` (model: `hvd_yolo/scaling.py`), "
             f"{m['created']}. Inputs: the share of the fp32 allreduce that overlap hides, "
             f"{m['overlap']:.2f} (measured: `hvd-yolo plan` when a plan_*.json is here, else "
             "cluster.json's 2-node training section, overlap on vs off); how much compute "
             f"slows per second of transfer in flight beside it, {m.get('contention', 0.0):.2f} "
             "(measured from the same two runs: applied to the measured points of (a); 0 in (b) "
             "and the projection, where GPUs compute and CPU cores move the bytes); the link "
             "fraction of "
             f"Horovod's 16 MiB allreduce under the package's mpirun line, {m['link_fraction']:.2f} "
             "(measured: mpi section, 2 nodes at 25 Mbit/s); per-hop latency of a GPU cluster "
             f"{m['alpha_gpu_s'] * 1e6:.0f} us (assumed: not measurable here).", "",
             "## (b) Horovod's published 512-GPU benchmark (128 x 4 P100, 25 Gbit/s RoCE)", "",
             "| network | parameters | forward share (measured) | P100 img/s (published) | "
             "published efficiency | model | difference |", "|---|---|---|---|---|---|---|"]
    for r in m["published"]:
        lines.append(f"| {r['network']} | {r['params'] / 1e6:.1f} M | {r['forward_share']:.2f} | "
                     f"{r['p100_img_s']:g} | {r['published']:.2f} | {r['model']:.2f} | "
                     f"{r['error']:+.2f} |")
    lines += ["", f"Sources: {m['sources']}.", ""]
    if m["measured"]:
        lines += ["## (a) The measured points at the emulated H100 + 10 GbE rate", "",
                  "Inputs measured apart from these runs (see validate_measured): one rank's "
                  "compute, the link fraction of Horovod's 16 MiB allreduce with the run's "
                  "launcher on as many nodes, the overlap share and contention, PowerSGD's "
                  "extra compute.", "",
                  "| run | nodes | link | launcher | link fraction | config | measured img/s "
                  "| model img/s | error |", "|---|---|---|---|---|---|---|---|---|"]
        for r in m["measured"]:
            lines.append(f"| {r['run']} | {r['nodes']} | {r['link']} | {r['launcher']} | "
                         f"{r['link_fraction']:.2f} | {r['config']} | {r['measured']:.2f} | "
                         f"{r['model']:.2f} | {r['error']:+.0%} |")
        lines.append("")
    lines += ["## Projection: YOLOv3 416, batch 32 per H100 (254 img/s), efficiency", "",
              "| link | nodes | fp32 | fp16 | PowerSGD r4 | local SGD k4 | local SGD k4, "
              "overlapped | fp16, 8 GPUs/node flat | fp16, 8 GPUs/node hierarchical |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in m["projection"]:
        lines.append(f"| {r['link_Gbps']} Gbit/s | {r['nodes']} | {r['fp32']:.2f} | "
                     f"{r['fp16']:.2f} | {r['powersgd']:.2f} | {r['local']:.2f} | "
                     f"{r['local_overlap']:.2f} | "
                     f"{r['fp16_8gpu_flat']:.2f} | {r['fp16_8gpu_hier']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
