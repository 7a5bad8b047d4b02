"""How much of YOLOv3's gradient does fp16 compression lose on CPU ranks (no loss scaling)?

`dist.compression=fp16` casts each rank's fp32 gradient to half for the wire: values below
2**-25 (~3e-8) become 0 and values below 2**-14 (~6.1e-5) keep fewer bits (subnormals). This
trains the model on the synthetic shapes in one process (the product's loss, SGD, warm-up) and,
at the given steps, reports over all gradient values: the fraction of non-zero values fp16
zeroes, the fraction of the gradient's L2 norm they carry, the worst tensor's lost norm, the
fraction that are subnormal, and the relative L2 error of the fp16 round trip.

    .venv/bin/python -m benchmarks.fp16_underflow --model yolov3 --size 256 --steps 0 10 40
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from hvd_yolo.config import OptimConfig
from hvd_yolo.data.synthetic import CLASS_NAMES, make_samples
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import build_model
from hvd_yolo.optim import build_optimizer, lr_at, set_lr

SUBNORMAL = 2.0 ** -14  # smallest normal fp16


def fp16_loss(grads: list[torch.Tensor]) -> dict[str, float]:
    """What the fp16 round trip does to these gradients (all tensors together)."""
    nonzero = zeroed = subnormal = 0
    total_sq = zeroed_sq = err_sq = 0.0
    worst = 0.0
    for g in grads:
        g = g.detach().double()
        h = g.float().half().double()
        lost = (g != 0) & (h == 0)
        nonzero += int((g != 0).sum())
        zeroed += int(lost.sum())
        subnormal += int(((g.abs() < SUBNORMAL) & (h != 0)).sum())
        sq, lost_sq = float((g * g).sum()), float((g[lost] ** 2).sum())
        total_sq, zeroed_sq, err_sq = total_sq + sq, zeroed_sq + lost_sq, err_sq + float(((g - h) ** 2).sum())
        if sq > 0:
            worst = max(worst, (lost_sq / sq) ** 0.5)
    return {"zeroed_values": zeroed / max(1, nonzero), "zeroed_norm": (zeroed_sq / total_sq) ** 0.5,
            "worst_tensor_zeroed_norm": worst, "subnormal_values": subnormal / max(1, nonzero),
            "relative_l2_error": (err_sq / total_sq) ** 0.5, "grad_norm": total_sq ** 0.5}


def batches(size: int, batch: int, seed: int):
    """Endless batches of synthetic shapes at ``size`` px (images in [0, 1], targets [N, 6])."""
    step = 0
    while True:
        samples = make_samples(batch, seed=seed + step, size=size)
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
        rows = [[i, c, *b] for i, s in enumerate(samples) for b, c in zip(s.boxes, s.classes)]
        yield images.float() / 255, torch.tensor(rows, dtype=torch.float32)
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov3", choices=["yolov3", "yolov3-tiny"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 40],
                        help="measure the gradient of these steps")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = build_model(args.model, len(CLASS_NAMES)).train()
    criterion = YoloLoss(model)
    opt = build_optimizer(model, OptimConfig(lr=args.lr))
    data = batches(args.size, args.batch_size, args.seed)
    for step in range(max(args.steps) + 1):
        images, targets = next(data)
        loss, _ = criterion(model(images), targets)
        opt.zero_grad()
        loss.backward()
        if step in args.steps:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            print(json.dumps({"step": step, "loss": round(loss.item(), 4),
                              **{k: float(f"{v:.4g}") for k, v in fp16_loss(grads).items()}}),
                  flush=True)
        set_lr(opt, lr_at(step, 10 ** 6, args.lr, args.warmup, 1.0))
        opt.step()


if __name__ == "__main__":
    main()
