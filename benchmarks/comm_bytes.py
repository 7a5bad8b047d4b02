"""Bytes one rank puts into allreduces per optimizer step, by synchronisation mode, for a model
(default YOLOv3, 80 classes, whose parameter shapes do not depend on the input size):
fp32 and fp16 gradients, PowerSGD at ranks 1 and 4 (hvd_yolo.comm.powersgd's own split into
compressed and uncompressed tensors), local SGD every k steps (the change of the parameters
and BatchNorm statistics in fp16, the default, or them in fp32; with the momentum, which is
averaged in fp32, 4 bytes per parameter more; amortised over k).

    .venv/bin/python benchmarks/comm_bytes.py [--model yolov3] [--json PATH]

Counted from the tensors each mode sends; tests/test_powersgd.py and tests/test_local_sgd.py
check that the training optimizers count the same payload while they send it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hvd_yolo.comm.powersgd import matrix_shape, wire_elements
from hvd_yolo.model.yolov3 import build_model


def table(model_name: str, classes: int = 80) -> dict:
    model = build_model(model_name, classes)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    rows = {"fp32": 4 * n, "fp16": 2 * n}
    for r in (1, 4):
        rows[f"powersgd_rank{r}"] = 4 * sum(wire_elements(p.shape, r) for p in params)
    for k in (4, 16):
        rows[f"local_sgd_k{k}"] = 2 * (n + buffers) / k
        rows[f"local_sgd_k{k}_fp32"] = 4 * (n + buffers) / k
        rows[f"local_sgd_k{k}_momentum"] = (2 * (n + buffers) + 4 * n) / k
    compressed = [p for p in params if matrix_shape(p.shape, 4) is not None]
    return {
        "model": model_name, "classes": classes, "parameters": n, "gradient_tensors": len(params),
        "powersgd_rank4_compressed_tensors": len(compressed),
        "powersgd_rank4_compressed_parameters": sum(p.numel() for p in compressed),
        "bytes_per_step": rows,
        "fewer_bytes_than_fp16": {k: rows["fp16"] / v for k, v in rows.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="yolov3", choices=("yolov3", "yolov3-tiny"))
    ap.add_argument("--json", default=None, help="write the table here as JSON")
    args = ap.parse_args()
    result = table(args.model)
    for name, b in result["bytes_per_step"].items():
        print(f"{name:24s} {b / 1e6:10.2f} MB/step  {result['fewer_bytes_than_fp16'][name]:7.1f}x "
              f"fewer than fp16")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
