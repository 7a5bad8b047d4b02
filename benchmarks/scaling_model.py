#!/usr/bin/env python
"""The alpha-beta ring-allreduce model, fitted to the simulated cluster, and its projection.

    .venv/bin/python benchmarks/scaling_model.py   # reads/writes benchmarks/results/cluster/

Model: one allreduce of S bytes on n nodes takes t = 2(n-1)·alpha + 2(n-1)/n · S/B.
alpha and B are fitted (least squares on relative error) to the 2-node Gloo sweep at 1 Gbit/s
(cluster.json "nodes" section, made by benchmarks/cluster_bench.py), then checked against the
measured 3- and 4-node times. The projection puts YOLOv3 416 at 8-512 nodes on 10/25/100 Gbit/s
links, with the per-GPU compute time of docs/GPU.md; its assumptions are written into
RESULTS.md next to the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cluster"
LINK_BPS = 1e9  # the link rate the fit was measured at
# docs/GPU.md: H100, 1 rank, `hvd-yolo bench train` YOLOv3 416 px, batch 32, no compression:
# 263 img/s -> one forward + backward of 32 images.
GPU_IMG_S, GPU_BATCH = 263.0, 32
YOLOV3_PARAMS = 61_949_149  # trainable parameters at 80 classes (hvd-yolo model info)
FUSION_BYTES = 128 * 2**20  # Horovod's default fusion buffer: one allreduce call per 128 MiB
BACKWARD_SHARE = 2 / 3  # backward is ~2/3 of forward + backward
NODES = (8, 16, 32, 64, 128, 256, 512)
LINKS_GBPS = (10, 25, 100)
ALPHA_DC = 25e-6  # assumed per-hop latency of a GPU cluster's network + NCCL (second table)


def ring_time(n: int, nbytes: float, alpha: float, bw: float) -> float:
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw


def fit(points: list[tuple[int, float, float]]) -> tuple[float, float]:
    """alpha (s) and B (bytes/s) from (n, bytes, seconds), minimising the relative error."""
    a = np.array([[2 * (n - 1), 2 * (n - 1) / n * s] for n, s, _ in points])
    t = np.array([t for _, _, t in points])
    (alpha, inv_b), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return float(alpha), float(1 / inv_b)


def step_time(n: int, grad_bytes: float, alpha: float, bw: float, overlap: bool) -> float:
    """Compute + allreduce of one step; with overlap the allreduce runs during backward."""
    t_c = GPU_BATCH / GPU_IMG_S
    calls = max(1, int(np.ceil(grad_bytes / FUSION_BYTES)))
    t_ar = calls * 2 * (n - 1) * alpha + 2 * (n - 1) / n * grad_bytes / bw
    if not overlap:
        return t_c + t_ar
    return max(t_c, (1 - BACKWARD_SHARE) * t_c + t_ar)


def project(alpha: float, eta: float, grad32: float) -> list[dict]:
    """Step time and efficiency per link rate and node count, fp32/fp16, overlap on/off."""
    rows = []
    for gbps in LINKS_GBPS:
        b = gbps * 1e9 / 8 * eta
        for n in NODES:
            row = {"link_Gbps": gbps, "nodes": n}
            for comp, nbytes in (("fp32", grad32), ("fp16", grad32 / 2)):
                for ov in (False, True):
                    st = step_time(n, nbytes, alpha, b, ov)
                    key = f"{comp}_{'overlap' if ov else 'nooverlap'}"
                    row[key + "_step_s"] = st
                    row[key + "_efficiency"] = GPU_BATCH / GPU_IMG_S / st
            rows.append(row)
    return rows


def main() -> int:
    path = OUT / "cluster.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "nodes" not in record:
        print(f"scaling_model: no 2-4 node measurements in {path}: run "
              "benchmarks/cluster_bench.py first")
        return 0
    nodes = record["nodes"]
    pts = {int(n): [(int(n), float(s), row["time_s"]) for s, row in v["sizes"].items()]
           for n, v in nodes.items()}
    alpha, bw = fit(pts[2])
    eta = bw * 8 / LINK_BPS  # fraction of the link rate the fitted B reaches
    check = []
    for n, rows in sorted(pts.items()):
        for _, s, t in rows:
            p = ring_time(n, s, alpha, bw)
            check.append({"nodes": n, "bytes": s, "measured_s": t, "model_s": p,
                          "error": p / t - 1})
    grad32 = 4 * YOLOV3_PARAMS
    proj = {"fitted": project(alpha, eta, grad32), "datacenter": project(ALPHA_DC, eta, grad32)}
    model = {"alpha_s": alpha, "B_bytes_per_s": bw, "link_fraction": eta, "check": check,
             "alpha_datacenter_s": ALPHA_DC, "projection": proj,
             "compute_s": GPU_BATCH / GPU_IMG_S, "grad_bytes_fp32": grad32}
    (OUT / "scaling_model.json").write_text(json.dumps(model, indent=1) + "\n")
    _plot(proj, alpha)
    text = _measured(record) + "\n" + _markdown(model)
    (OUT / "RESULTS.md").write_text(text)
    print(text)
    return 0


def _measured(rec: dict) -> str:
    """The measured tables: allreduce bus bandwidth vs size, 2-node training at 1 Gbit/s."""
    lines = ["# Simulated cluster: measured over rate-limited links, and the scaling model", "",
             f"`{rec['command']}` on {rec['created']} ({rec['machine']['cores']} cores, load "
             f"average before {', '.join(f'{x:.1f}' for x in rec['machine']['load_before'])});"
             f" medians of {rec['rounds']} alternating rounds. Nodes are network namespaces "
             "with tbf-limited veth links (hvd-yolo cluster), jobs start from the login node.",
             "", "## Allreduce bus bandwidth, 2 nodes x 1 rank (fraction of the link rate)", "",
             "bus bandwidth = bytes x 2(n-1)/n / time: what each node's link carries per second.",
             ""]
    for rate, per in rec.get("allreduce", {}).items():
        sizes = sorted({int(k) for v in per.values() for k in v["sizes"]})
        lines += [f"**{rate}**", "", "| launcher | " + " | ".join(
            f"{s / 2**20:g} MiB" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for launcher, v in per.items():
            cells = [f"{v['sizes'][str(s)]['link_fraction']:.2f} "
                     f"({v['sizes'][str(s)]['time_s'] * 1e3:.1f} ms)"
                     if str(s) in v["sizes"] else "-" for s in sizes]
            lines.append(f"| {launcher} | " + " | ".join(cells) + " |")
        lines.append("")
    train = rec.get("train", {})
    if train:
        single = train.get("single", {}).get("img_per_sec_total")
        lines += ["## Training, 2 nodes x 1 rank at 1 Gbit/s (yolov3-tiny 320, batch 8, Gloo)",
                  "", "| config | img/s (rounds) | step s | compute s | allreduce wait s | "
                  "efficiency |", "|---|---|---|---|---|---|"]
        for name, r in train.items():
            eff = (f"{r['img_per_sec_total'] / (2 * single):.2f}"
                   if single and name != "single" else "")
            rounds = ", ".join(f"{x:.2f}" for x in r["img_per_sec_rounds"])
            lines.append(f"| {name} | {r['img_per_sec_total']:.2f} ({rounds}) | "
                         f"{r['step_time_mean_s']:.3f} | {r['compute_time_mean_s']:.3f} | "
                         f"{r['allreduce_wait_mean_s']:.3f} | {eff} |")
        lines.append("")
        for comp in ("fp32", "fp16"):
            on, off = train.get(f"{comp}_overlap_acc1"), train.get(f"{comp}_nooverlap_acc1")
            if on and off and off["allreduce_wait_mean_s"] > 0:
                hidden = 1 - on["allreduce_wait_mean_s"] / off["allreduce_wait_mean_s"]
                lines.append(f"- {comp}: overlap hides {hidden:.0%} of the allreduce wait "
                             f"({off['allreduce_wait_mean_s']:.3f} -> "
                             f"{on['allreduce_wait_mean_s']:.3f} s/step); step "
                             f"{off['step_time_mean_s']:.3f} -> {on['step_time_mean_s']:.3f} s.")
        for ov in ("overlap", "nooverlap"):
            a, b = train.get(f"fp32_{ov}_acc1"), train.get(f"fp16_{ov}_acc1")
            if a and b:
                lines.append(f"- fp16/fp32 img/s ({ov}): "
                             f"{b['img_per_sec_total'] / a['img_per_sec_total']:.2f}.")
        lines.append("")
    return "\n".join(lines)


def _markdown(m: dict) -> str:
    lines = [
        "## Scaling model (alpha-beta ring allreduce)", "",
        "Made by `benchmarks/scaling_model.py` from `cluster.json`. Fit on the 2-node sweep at "
        f"1 Gbit/s (Gloo): alpha = {m['alpha_s'] * 1e3:.2f} ms, B = "
        f"{m['B_bytes_per_s'] * 8 / 1e9:.3f} Gbit/s ({m['link_fraction']:.2f} of the link).", "",
        "| nodes | MiB | measured ms | model ms | error |", "|---|---|---|---|---|"]
    for c in m["check"]:
        lines.append(f"| {c['nodes']} | {c['bytes'] / 2**20:g} | {c['measured_s'] * 1e3:.1f} | "
                     f"{c['model_s'] * 1e3:.1f} | {c['error']:+.0%} |")
    others = [abs(c["error"]) for c in m["check"] if c["nodes"] > 2 and c["bytes"] >= 2**22]
    if others:
        lines += ["", f"On 3 and 4 nodes, for messages >= 4 MiB, the model is off by "
                  f"{np.mean(others):.0%} on average (largest {max(others):.0%})."]
    for which, alpha in (("fitted", m["alpha_s"]), ("datacenter", m["alpha_datacenter_s"])):
        lines += ["", f"### Projection: YOLOv3 416, one GPU per node, alpha = "
                  f"{alpha * 1e6:.0f} us ({'as fitted here' if which == 'fitted' else 'assumed'})"
                  "; efficiency (step time)", "",
                  "| link | nodes | fp32 | fp32 overlap | fp16 | fp16 overlap |",
                  "|---|---|---|---|---|---|"]
        for r in m["projection"][which]:
            lines.append(f"| {r['link_Gbps']} Gbit/s | {r['nodes']} | " + " | ".join(
                f"{r[k + '_efficiency']:.2f} ({r[k + '_step_s'] * 1e3:.0f} ms)"
                for k in ("fp32_nooverlap", "fp32_overlap", "fp16_nooverlap", "fp16_overlap"))
                + " |")
    lines += ["", "![projection](scaling_model.png)", "", "Assumptions:",
              f"- compute per step {m['compute_s'] * 1e3:.0f} ms: H100, batch {GPU_BATCH} at "
              f"416 px, {GPU_IMG_S:g} img/s for one rank (docs/GPU.md), the same on every node "
              "(no stragglers, no data-loading stalls);",
              f"- gradients {m['grad_bytes_fp32'] / 2**20:.0f} MiB fp32 ({YOLOV3_PARAMS:,} "
              "parameters), half in fp16; one allreduce call per 128 MiB fusion buffer, each "
              "paying 2(n-1) alpha;",
              "- one flat ring over all nodes, one GPU per node, no hierarchy (NCCL's trees and "
              "intra-node NVLink would do better at large n);",
              f"- B = link rate x {m['link_fraction']:.2f} (the fraction the simulated 1 Gbit/s "
              "link reached); alpha as fitted here holds the software cost per ring step of CPU "
              "ranks (Horovod + Gloo over TCP through namespaces), far above a GPU cluster's "
              f"(the second table assumes {m['alpha_datacenter_s'] * 1e6:.0f} us per hop); "
              "at large n the 2(n-1) alpha term dominates, so that choice decides the outcome;",
              f"- overlap: the allreduce runs during backward ({BACKWARD_SHARE:.2f} of compute) "
              "without slowing it, so step = max(compute, forward + allreduce); without overlap "
              "step = compute + allreduce."]
    return "\n".join(lines) + "\n"


def _plot(projections: dict[str, list[dict]], alpha: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling_model: matplotlib is not installed: no PNG", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, len(LINKS_GBPS), figsize=(12, 7), sharey=True, squeeze=False)
    for row, (which, proj) in enumerate(projections.items()):
        a = alpha if which == "fitted" else ALPHA_DC
        for ax, gbps in zip(axes[row], LINKS_GBPS):
            rows = [r for r in proj if r["link_Gbps"] == gbps]
            for key, style in (("fp32_nooverlap", "o--"), ("fp32_overlap", "o-"),
                               ("fp16_nooverlap", "s--"), ("fp16_overlap", "s-")):
                ax.plot([r["nodes"] for r in rows], [r[key + "_efficiency"] for r in rows],
                        style, label=key.replace("_", " "))
            ax.set_xscale("log", base=2)
            ax.set_title(f"YOLOv3 416, {gbps} Gbit/s, alpha {a * 1e6:.0f} us", fontsize=9)
            ax.set_xlabel("nodes (1 GPU each)")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("scaling efficiency (model)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "scaling_model.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
