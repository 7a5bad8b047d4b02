"""YOLOv3-tiny learns through `hvd-yolo train` itself: 2 ranks under mpirun, the product's defaults.

Not a smoke test: the model starts from random weights and must find the objects of the images
it trained on, scored by the loop's own distributed evaluation (EMA weights, eval-mode BN,
class-aware NMS, boxes mapped back through the letterbox, pycocotools). Defaults kept: SGD with
momentum, warm-up and cosine LR, weight EMA, fp16-compressed allreduce, gradient clipping;
multi-scale is switched on (96-160 px). Set for a small machine: 24 drawn images of 96-160 px,
4 per rank per step, 252 steps, per-rank LR 0.1 (the default 0.01 is for long runs), one
thread per rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.datagen import synthetic_shards
from tests.mpi_harness import run_cli

IMAGES, BATCH, EPOCHS = 24, 4, 84  # 3 steps per epoch on 2 ranks: 252 steps


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(1500)
def test_yolov3_tiny_learns_synthetic_shapes(tmp_path: Path) -> None:
    data = synthetic_shards(tmp_path, IMAGES, seed=1, shards=4, size_range=(96, 160))
    out = tmp_path / "run"
    res = run_cli(["train", "--set", f"data.train={data}", "--set", f"data.val={data}",
                   "--set", "data.workers=0", "--set", "input.multiscale=true",
                   "--set", "input.min_size=96", "--set", "input.max_size=160",
                   "--set", "input.size=128", "--set", f"optim.batch_size={BATCH}",
                   "--set", f"optim.epochs={EPOCHS}", "--set", "optim.warmup_steps=20",
                   "--set", "optim.lr=0.1", "--set", "eval.every=0",
                   "--set", f"run.out_dir={out}", "--set", "run.progress=false",
                   "--set", "dist.threads=1"], np=2, timeout=1400)
    start = next(t for t in res.rank_lines(0) if t.startswith("training "))
    assert "on 2 rank(s)" in start and "compression fp16" in start, start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    final = [r for r in records if r["type"] == "eval"][-1]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-10:]) / 10
    print(f"\n{len(steps)} steps; loss {first:.4f} -> {last:.4f}; mAP50 {final['mAP50']:.3f}, "
          f"mAP {final['mAP']:.3f}, per class {final['per_class_AP']}")
    assert len(steps) == EPOCHS * IMAGES // (2 * BATCH)
    assert len({r["size"] for r in steps}) > 1  # multi-scale was on
    assert last < 0.3 * first
    assert final["mAP50"] >= 0.8  # 0.91 measured
    assert final["mAP"] >= 0.35  # 0.48 measured
