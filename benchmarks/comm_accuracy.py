"""Accuracy of each synchronisation mode: `hvd-yolo demo` (2 ranks, YOLOv3-tiny on the synthetic
shapes, AdamW) once per mode, the final validation mAP of each against synchronous fp16.

    .venv/bin/python benchmarks/comm_accuracy.py [--epochs 8] [--size 128] [--train-images 256]
        [--seed N] [--modes fp16,powersgd_r4,...] [--json PATH]
    # the demo's own setting (benchmarks/results/comm_accuracy_demo.json, seeds 0-2):
    .venv/bin/python benchmarks/comm_accuracy.py --epochs 12 --size 256 --train-images 384 \
        --json benchmarks/results/comm_accuracy_demo.json

Modes (`benchmarks/sync_modes.py`): fp16 (the demo's default), fp32, powersgd_r1, powersgd_r4
(PowerSGD from the end of the demo's 30-step LR warm-up), local_k4, local_k16 (local SGD,
averaged every k steps), local_k4_overlap (each average landing one period late).
The same data, seed and schedule in every run of a seed; one run per mode and seed. Writes the
JSON (default benchmarks/results/comm_accuracy.json) after every run; results of other seeds
are named MODE_seedN and kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sync_modes import SYNC_MODES  # noqa: E402


def run_mode(name: str, demo_args: list[str], work: Path) -> dict:
    out = work / name
    argv = [str(Path(sys.executable).parent / "hvd-yolo"), "demo", *demo_args, "--out", str(out)]
    for item in SYNC_MODES[name]:
        argv += ["--set", item]
    t0 = time.time()
    with (work / f"{name}.log").open("w") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    took = time.time() - t0
    if rc != 0:
        return {"rc": rc, "seconds": took}
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["type"] == "eval"][-1]
    steps = [r for r in records if r["type"] == "step"]
    return {"rc": 0, "seconds": took, "steps": steps[-1]["step"], "mAP50": final["mAP50"],
            "mAP": final["mAP"], "final_loss": steps[-1]["loss"],
            "bytes_sent_rank0": steps[-1].get("bytes_sent"), "set": SYNC_MODES[name]}


def compare_within_seed(results: dict[str, dict], seed: int) -> None:
    """Each of the seed's results gains its mAP@0.5 minus fp16's and fp32's of the same seed."""
    suffix = "" if seed == 0 else f"_seed{seed}"
    for base in ("fp16", "fp32"):
        ref = results.get(base + suffix, {})
        if ref.get("rc") != 0:
            continue
        for name in SYNC_MODES:
            got = results.get(name + suffix, {})
            if got.get("rc") == 0:
                got[f"mAP50_minus_{base}"] = got["mAP50"] - ref["mAP50"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="the demo's input size")
    ap.add_argument("--train-images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0,
                    help="the demo's seed (data, weights); results named MODE_seedN when not 0")
    ap.add_argument("--modes", default=",".join(SYNC_MODES))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "comm_accuracy.json"))
    args = ap.parse_args()
    path = Path(args.json)
    record = json.loads(path.read_text()) if path.exists() else {}
    demo_args = ["--epochs", str(args.epochs), "--size", str(args.size),
                 "--train-images", str(args.train_images)]
    commands = record.setdefault("commands", [])
    if "command" in record:
        commands.insert(0, record.pop("command"))
    commands.append(" ".join(["benchmarks/comm_accuracy.py", *sys.argv[1:]]))
    record["demo"] = ("hvd-yolo demo " + " ".join(demo_args) + " --seed N (2 ranks, batch 8 per "
                      "rank, AdamW, 64 validation images)")
    demo_args += ["--seed", str(args.seed)]
    results = record.setdefault("modes", {})
    with tempfile.TemporaryDirectory(prefix="hvd_comm_acc_") as tmp:
        for name in args.modes.split(","):
            key = name if args.seed == 0 else f"{name}_seed{args.seed}"
            results[key] = run_mode(name, demo_args, Path(tmp))
            compare_within_seed(results, args.seed)
            print(f"{key}: {results[key]}", flush=True)
            path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
