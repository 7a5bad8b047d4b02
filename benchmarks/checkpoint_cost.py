"""What the checkpoint seal costs: a YOLOv3 checkpoint (weights, SGD momentum, EMA) saved with
``torch.save`` + fsync vs ``checkpoint.atomic_save`` (sealed), and loaded with ``torch.load`` vs
``checkpoint.load`` (verified). Rounds alternate A B A B A B; medians are printed.

    .venv/bin/python benchmarks/checkpoint_cost.py [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hvd_yolo import checkpoint
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.optim import ModelEMA


def yolov3_state() -> dict:
    """A training checkpoint's bulk: YOLOv3 (80 classes), its momentum buffers and its EMA."""
    model = build_model("yolov3", 80)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the momentum buffers
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "ema": ModelEMA(model).state_dict()}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = yolov3_state()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain, sealed = Path(tmp) / "plain.pt", Path(tmp) / "sealed.pt"

        def save_plain() -> None:
            with open(plain, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        cases = {
            "save torch.save+fsync": save_plain,
            "save sealed (atomic_save)": lambda: checkpoint.atomic_save(state, sealed),
            "load torch.load": lambda: torch.load(plain, map_location="cpu", weights_only=True),
            "load verified (checkpoint.load)": lambda: checkpoint.load(sealed),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(timed(fn))
        print(f"checkpoint: {sealed.stat().st_size / 1e6:.0f} MB")
        for name, ts in times.items():
            print(f"{name:34s} median {statistics.median(ts):.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
