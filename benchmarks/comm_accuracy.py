"""Accuracy of each synchronisation mode: `hvd-yolo demo` (2 ranks, YOLOv3-tiny on the synthetic
shapes, AdamW) once per mode, the final validation mAP of each against synchronous fp16.

    .venv/bin/python benchmarks/comm_accuracy.py [--epochs 8] [--modes fp16,powersgd_r4,...]

Modes: fp16 (the demo's default), none, powersgd_r1, powersgd_r4 (PowerSGD from the end of the
demo's 30-step LR warm-up), local_k4, local_k16 (local SGD, weights averaged every k steps).
The same data, seed and schedule in every run; one run per mode (seed noise is not measured).
Writes benchmarks/results/comm_accuracy.json after every run.
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
MODES = {
    "fp16": [],
    "none": ["dist.compression=none"],
    "powersgd_r1": ["dist.compression=powersgd", "dist.powersgd_rank=1",
                    "dist.powersgd_start_step=30"],
    "powersgd_r4": ["dist.compression=powersgd", "dist.powersgd_rank=4",
                    "dist.powersgd_start_step=30"],
    "local_k4": ["dist.sync=local", "dist.local_steps=4"],
    "local_k16": ["dist.sync=local", "dist.local_steps=16"],
}


def run_mode(name: str, epochs: int, work: Path) -> dict:
    out = work / name
    argv = [str(Path(sys.executable).parent / "hvd-yolo"), "demo", "--epochs", str(epochs),
            "--out", str(out)]
    for item in MODES[name]:
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
            "bytes_sent_rank0": steps[-1].get("bytes_sent"), "set": MODES[name]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "comm_accuracy.json"))
    args = ap.parse_args()
    path = Path(args.json)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(command=" ".join(["benchmarks/comm_accuracy.py", *sys.argv[1:]]),
                  epochs=args.epochs, demo="hvd-yolo demo --epochs N (2 ranks, 256 px, AdamW)")
    results = record.setdefault("modes", {})
    with tempfile.TemporaryDirectory(prefix="hvd_comm_acc_") as tmp:
        for name in args.modes.split(","):
            results[name] = run_mode(name, args.epochs, Path(tmp))
            if "fp16" in results and results[name].get("rc") == 0 and results["fp16"].get("rc") == 0:
                results[name]["mAP50_minus_fp16"] = results[name]["mAP50"] - results["fp16"]["mAP50"]
            print(f"{name}: {results[name]}", flush=True)
            path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
