"""Time to accuracy of each synchronisation mode in an emulated GPU-cluster regime.

`hvd-yolo train` on 2 (``--nodes``) simulated nodes (`hvd_yolo.cluster`, one rank each,
horovodrun --gloo) whose link is set from the regime (`hvd_yolo.regime`: this machine's img/s
for the model and size against the accelerator's), on the demo's drawn-shapes data with the
demo's schedule (YOLOv3-tiny, AdamW, batch 8 per rank), evaluated after every epoch
(``--eval-every``). The same data, seed and schedule for every mode, one run each, in turn
(``--repeats N``: N alternating rounds, and each mode's final mAP over its runs). For
each mode: the training time to each evaluation (the sum over steps of the step's images / its
logged img/s, so the evaluations' own time is left out), the final mAP, and the time to the
first evaluation at or above ``--target`` mAP@0.5.

    python -m benchmarks.time_to_accuracy [--regime h100:10gbit] [--epochs 8] [--size 128]
        [--modes fp16,powersgd_r4,local_k4,fp32,powersgd_r4_fp32_warmup] [--target 0.5]
        [--seed 0] [--nodes 2] [--pin] [--eval-every 1] [--repeats 1]

Writes benchmarks/results/time_to_accuracy.json (``--json``) and, beside it, a plot of each
mode's mAP@0.5 against training time (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import cluster_bench as cb  # noqa: E402
from benchmarks.sync_modes import SYNC_MODES  # noqa: E402
from hvd_yolo import cluster, regime  # noqa: E402
from hvd_yolo.commands.demo import demo_config  # noqa: E402
from hvd_yolo.data.synthetic import write_yolo_dataset  # noqa: E402
from hvd_yolo.shards.convert import convert_dataset  # noqa: E402


def curve(records: list[dict[str, Any]], global_batch: int) -> list[dict[str, float]]:
    """Each evaluation's step, mAP@0.5, mAP and training seconds up to it."""
    seconds, out = 0.0, []
    for r in records:
        if r["type"] == "step":
            seconds += global_batch / r["img_s"]
        elif r["type"] == "eval":
            out.append({"step": r["step"], "mAP50": r["mAP50"], "mAP": r["mAP"],
                        "train_s": round(seconds, 1)})
    return out


def run_key(mode: str, repeat: int) -> str:
    """The result's key of a mode's run: the mode's name, then ``MODE_run2``, ``MODE_run3``..."""
    return mode if repeat == 1 else f"{mode}_run{repeat}"


def run_mode(key: str, mode: str, cfg: Path, work: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    """One `hvd-yolo train` of ``mode`` on the simulated nodes (run ``key``); its evaluation
    curve."""
    out = work / key
    argv = ["train", "--config", str(cfg), "--set", f"run.out_dir={out}"]
    for item in SYNC_MODES[mode]:
        argv += ["--set", item]
    t0 = time.time()
    rc = cb.run(cb.job_argv("gloo", args.nodes, cb.hosts_of(args.nodes), argv, args.pin),
                args.timeout, work / f"{key}.log")
    if rc != 0:
        return {"rc": rc, "mode": mode, "log": (work / f"{key}.log").read_text()[-3000:]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = curve(records, args.nodes * args.batch_size)
    reached = next((e for e in evals if e["mAP50"] >= args.target), None)
    return {"rc": 0, "mode": mode, "wall_s": round(time.time() - t0, 1), "evals": evals,
            "final_mAP50": evals[-1]["mAP50"], "final_mAP": evals[-1]["mAP"],
            "train_s": evals[-1]["train_s"],
            "time_to_target_s": reached["train_s"] if reached else None,
            "step_at_target": reached["step"] if reached else None, "set": SYNC_MODES[mode]}


def spread(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mode over its runs (``--repeats``): how many, the final mAP@0.5's mean, min and max,
    mAP@0.5:0.95's mean, and the mean final mAP@0.5 minus fp32's mean (when fp32 ran)."""
    finals: dict[str, list[tuple[float, float]]] = {}
    for key, r in result["modes"].items():
        if not r.get("rc"):
            finals.setdefault(r.get("mode", key), []).append((r["final_mAP50"], r["final_mAP"]))
    rows = []
    for mode, got in finals.items():
        m50 = [g[0] for g in got]
        rows.append({"mode": mode, "runs": len(got), "mAP50_mean": sum(m50) / len(m50),
                     "mAP50_min": min(m50), "mAP50_max": max(m50),
                     "mAP_mean": sum(g[1] for g in got) / len(got)})
    ref = next((r["mAP50_mean"] for r in rows if r["mode"] == "fp32"), None)
    for r in rows:
        r["mAP50_vs_fp32"] = None if ref is None else r["mAP50_mean"] - ref
    return rows


def spread_table(rows: list[dict[str, Any]]) -> str:
    """Markdown of :func:`spread`."""
    lines = ["| mode | runs | final mAP@0.5 mean (min-max) | final mAP@0.5:0.95 mean | "
             "mAP@0.5 vs fp32 |", "| --- | ---: | --- | ---: | ---: |"]
    for r in rows:
        vs = "" if r["mAP50_vs_fp32"] is None else f"{r['mAP50_vs_fp32']:+.3f}"
        lines.append(f"| {r['mode']} | {r['runs']} | {r['mAP50_mean']:.3f} "
                     f"({r['mAP50_min']:.3f}-{r['mAP50_max']:.3f}) | {r['mAP_mean']:.3f} | {vs} |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """Markdown: each mode's training and wall seconds, final mAP, time to the target and its
    ratio to fp16's."""
    lines = [f"| mode | training s | wall s (with evaluations) | final mAP@0.5 | final mAP | "
             f"s to mAP@0.5 >= {result['target']} | vs fp16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fp16 = result["modes"].get("fp16", {}).get("time_to_target_s")
    for name, r in result["modes"].items():
        if r.get("rc"):
            lines.append(f"| {name} | failed (rc {r['rc']}) | | | | | |")
            continue
        got = r["time_to_target_s"]
        tt = f"{got:.0f} (step {r['step_at_target']})" if got is not None else "not reached"
        ratio = f"{got / fp16:.2f}" if got is not None and fp16 else ""
        lines.append(f"| {name} | {r['train_s']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['final_mAP50']:.3f} | {r['final_mAP']:.3f} | {tt} | {ratio} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """mAP@0.5 of each mode's evaluations against its training seconds, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours: dict[str, str] = {}
    for name, r in result["modes"].items():
        if not r.get("rc"):
            mode = r.get("mode", name)
            first = mode not in colours
            colours.setdefault(mode, f"C{len(colours)}")
            ax.plot([e["train_s"] for e in r["evals"]], [e["mAP50"] for e in r["evals"]],
                    marker="o", color=colours[mode], label=mode if first else None,
                    alpha=1.0 if first else 0.5)
    ax.axhline(result["target"], ls="--", color="grey", lw=1)
    ax.set(xlabel="training time (s, evaluations excluded)", ylabel="validation mAP@0.5",
           title=f"time to accuracy at emulated {result['regime']['regime']} "
                 f"({result['nodes']} nodes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regime", default="h100:10gbit")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=2,
                   help="simulated nodes, one rank each (more than 2 share this machine's cores: "
                        "give --host-img-s as one rank's img/s with all of them training)")
    p.add_argument("--pin", action="store_true",
                   help="each node's rank on one core, as cluster_bench --comm-pin")
    p.add_argument("--modes", default="fp16,powersgd_r4,local_k4,fp32,powersgd_r4_fp32_warmup")
    p.add_argument("--eval-every", type=int, default=1,
                   help="epochs between evaluations (local SGD averages in full before each, "
                        "as before every epoch-end checkpoint)")
    p.add_argument("--target", type=float, default=0.5, help="mAP@0.5 to reach")
    p.add_argument("--host-img-s", type=float, default=None,
                   help="one rank's img/s here at --size (default: measured)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every mode, in alternating rounds (4-rank runs differ from run "
                        "to run): the JSON's 'spread' gives each mode's mean, min and max")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                   "time_to_accuracy.json")
    args = p.parse_args(argv)
    missing = cluster.missing_requirements()
    if missing:
        print("skipped: no simulated cluster here, missing: " + "; ".join(missing))
        return 0
    plan = regime.plan_link(args.regime, "yolov3-tiny", args.size, args.batch_size,
                            args.host_img_s)
    print(f"regime {args.regime}: link {plan['link']} ({plan})", flush=True)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.time_to_accuracy " + " ".join(argv or sys.argv[1:]),
        "regime": plan, "epochs": args.epochs, "size": args.size, "batch_per_rank":
        args.batch_size, "nodes": args.nodes, "pinned": args.pin,
        "launcher": "horovodrun --gloo", "seed": args.seed,
        "target": args.target, "machine": {"platform": platform.platform(),
                                           "cores": os.cpu_count()},
        "load_before": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="hvd_yolo_tta_") as tmp:
        work = Path(tmp)
        for split, n, seed in (("train", args.train_images, 1000), ("val", args.val_images, 2000)):
            write_yolo_dataset(work / "src" / split, n, seed=seed + args.seed)
            convert_dataset("yolo", work / "src" / split, work / "shards" / split, shards=4)
        demo = argparse.Namespace(size=args.size, batch_size=args.batch_size,
                                  epochs=args.epochs, seed=args.seed)
        cfg = demo_config(demo, work)
        cfg["eval"]["every"], cfg["run"]["log_every"] = args.eval_every, 1
        cfg["run"]["progress"] = False
        (work / "tta.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cb.bring_up(args.nodes, plan["link"])
        try:
            for repeat in range(1, args.repeats + 1):
                for mode in args.modes.split(","):
                    key = run_key(mode, repeat)
                    result["modes"][key] = run_mode(key, mode, work / "tta.yaml", work, args)
                    print(key, json.dumps({k: v for k, v in result["modes"][key].items()
                                           if k != "evals"}), flush=True)
                    args.json.write_text(json.dumps(result, indent=1) + "\n")
        finally:
            cluster.down(cb.NAME)
    result["load_after"] = os.getloadavg()
    if args.repeats > 1:
        result["spread"] = spread(result)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print(table(result))
    if args.repeats > 1:
        print(spread_table(result["spread"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
