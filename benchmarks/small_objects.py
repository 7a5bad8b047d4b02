"""What the input size buys on small objects: the same data and steps at several input sizes.

A variant of the demo's shapes whose objects are small (about 8-25 px on 512-640 px images, all
in COCO's "small" range, < 32² px) is drawn and converted once; then `hvd-yolo train` runs on 2
ranks (the package's mpirun line) for each setting, with the same seed, data, batch and number
of steps, and the final evaluation's mAP, mAP@0.5 and AP_small are read from its metrics.jsonl.
Settings: fixed 320, fixed 608, fixed 416, and multi-scale 320-608 (evaluated at 416).

    python -m benchmarks.small_objects [--epochs 8] [--train-images 256] [--out DIR]

Writes benchmarks/results/small_objects.json and prints a Markdown table. The wall time of each
run is reported as measured (2 ranks on this machine); accuracy is what this compares.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_run import train_run  # noqa: E402
from hvd_yolo.data.synthetic import write_yolo_dataset  # noqa: E402
from hvd_yolo.shards.convert import convert_dataset  # noqa: E402

# (label, train size or None for multi-scale, evaluation size)
SETTINGS = (("fixed 320", 320, 320), ("fixed 608", 608, 608), ("fixed 416", 416, 416),
            ("multi-scale 320-608", None, 416))
SMALL = {"size": None, "size_range": (512, 640), "min_frac": 0.014, "max_frac": 0.04,
         "max_objects": 12}


def draw(root: Path, train_images: int, val_images: int, seed: int) -> tuple[Path, Path]:
    """The small-object shapes dataset, converted: (train shards, validation shards)."""
    for split, n, s in (("train", train_images, seed), ("val", val_images, seed + 1)):
        write_yolo_dataset(root / "src" / split, n, seed=s, **SMALL)
        convert_dataset("yolo", root / "src" / split, root / split, shards=4)
    return root / "train", root / "val"


def train(label: str, size: int | None, eval_size: int, train: Path, val: Path, out: Path,
          args: argparse.Namespace) -> dict[str, Any]:
    """One `hvd-yolo train` run on 2 ranks; its final evaluation and wall time."""
    sets = {"data.train": train, "data.val": val, "data.workers": 1, "model.name": args.model,
            "optim.epochs": args.epochs, "optim.batch_size": args.batch_size,
            "optim.warmup_steps": 30, "input.size": eval_size, "eval.every": 0,
            "eval.batch_size": 8, "run.out_dir": out, "run.seed": args.seed,
            "run.progress": False, "dist.threads": 1}
    if size is None:
        sets |= {"input.multiscale": True, "input.min_size": 320, "input.max_size": 608}
    res = train_run(sets, 2, label, timeout=args.timeout)
    final = res.last("eval")
    steps = max(r["step"] for r in res.records if r["type"] == "step")
    figures = {k: final.get(k) for k in ("mAP", "mAP50", "AP_small", "AP_medium", "AP_large")}
    return {"setting": label, "train_size": size or "320-608", "eval_size": eval_size,
            "steps": steps, "wall_s": res.wall_s,  # NaN (no object of that size): null
            **{k: None if v is None or math.isnan(v) else v for k, v in figures.items()}}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | eval size | steps | mAP@0.5:0.95 | mAP@0.5 | AP small | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['eval_size']} | {r['steps']} | {r['mAP']:.4f} | "
                     f"{r['mAP50']:.4f} | {r['AP_small']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolov3-tiny")
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=7200, help="seconds per training run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "small_objects.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hvd_yolo_small_") as tmp:
        train_dir, val_dir = draw(Path(tmp), args.train_images, args.val_images, 1000 + args.seed)
        rows = []
        for label, size, eval_size in SETTINGS:
            rows.append(train(label, size, eval_size, train_dir, val_dir,
                              Path(tmp) / label.replace(" ", "_"), args))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "small_objects", "command": "python -m benchmarks.small_objects " +
              " ".join(sys.argv[1:]), "model": args.model, "dataset": SMALL | {
                  "train_images": args.train_images, "val_images": args.val_images},
              "epochs": args.epochs, "batch_size_per_rank": args.batch_size, "ranks": 2,
              "machine": f"{platform.processor() or platform.machine()}, CPU", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
