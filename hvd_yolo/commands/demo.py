"""`hvd-yolo demo`: the whole product on a built-in dataset, in a few minutes on a CPU.

1. draws the synthetic shapes dataset (train and validation splits, YOLO txt layout);
2. converts both to HDF5 shards with ``mpirun -np N hvd-yolo convert`` (each rank its shards);
3. trains YOLOv3-tiny with ``mpirun -np N hvd-yolo train`` (fp16-compressed allreduce);
4. evaluates on the validation shards (distributed COCO mAP) and prints the figures and where
   the checkpoint and logs are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from hvd_yolo.cli import RunError, UsageError
from hvd_yolo.launch import hvd_yolo_argv, mpirun_argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--train-images", type=int, default=384)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=256, help="input size (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per rank per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="extra training config overrides")


def _run(argv: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, check=False)
    if proc.returncode != 0:
        raise RunError(f"{what} failed (exit {proc.returncode}); see the output above")


def demo_config(args: argparse.Namespace, out: Path) -> dict:
    return {
        "data": {"train": str(out / "shards" / "train"), "val": str(out / "shards" / "val"),
                 "workers": 1},
        "model": {"name": "yolov3-tiny"},
        "input": {"size": args.size},
        "augment": {"flip": 0.5, "hsv": [0.01, 0.3, 0.3], "mosaic": 0.0},
        "optim": {"name": "adamw", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005,
                  "batch_size": args.batch_size, "epochs": args.epochs, "warmup_steps": 30,
                  "final_lr_ratio": 0.05, "ema": True, "ema_decay": 0.99},
        "dist": {"compression": "fp16", "threads": 1},
        "eval": {"every": max(1, args.epochs // 3), "batch_size": 16},
        "run": {"out_dir": str(out / "run"), "seed": args.seed, "log_every": 5,
                "keep_last": 2, "progress": True},
    }


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that would fail minutes later, before anything is drawn or deleted."""
    for name in ("np", "train_images", "val_images", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 32 or args.size % 32:
        raise UsageError(f"--size must be a positive multiple of 32, got {args.size}")


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.data.synthetic import write_yolo_dataset

    check_args(args)
    start = time.time()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    src = out / "source"
    print(f"=== 1/4 drawing the synthetic dataset into {src}", flush=True)
    write_yolo_dataset(src / "train", args.train_images, seed=1000 + args.seed)
    write_yolo_dataset(src / "val", args.val_images, seed=2000 + args.seed)

    for split in ("train", "val"):
        _run(mpirun_argv(args.np) + hvd_yolo_argv(
            "convert", "yolo", str(src / split), str(out / "shards" / split),
            "--shards", str(2 * args.np)), f"2/4 converting {split} to shards on {args.np} ranks")

    cfg_path = out / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(args, out), sort_keys=False))
    train_argv = hvd_yolo_argv("train", "--config", str(cfg_path))
    for item in args.overrides:
        train_argv += ["--set", item]
    _run(mpirun_argv(args.np) + train_argv, f"3/4 training on {args.np} ranks")

    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    steps = [r for r in records if r["type"] == "step"]
    if not evals:
        raise RunError("training finished without an evaluation")
    final = evals[-1]
    print(f"\n=== 4/4 results after {time.time() - start:.0f} s", flush=True)
    print(f"images/s (all ranks, last logged step): {steps[-1]['img_s']:.1f}")
    print(f"validation mAP@0.5:0.95 = {final['mAP']:.3f}")
    print(f"validation mAP@0.5      = {final['mAP50']:.3f}")
    print(f"checkpoint: {out / 'run' / 'checkpoints' / 'last.pt'} (best: best.pt)")
    print(f"metrics log: {out / 'run' / 'metrics.jsonl'}; config: {cfg_path}")
    return 0
