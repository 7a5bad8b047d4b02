"""`hvd-yolo detect`: run a checkpoint on image files or a shard directory.

Writes a COCO results json (``image_id, category_id, bbox [x, y, w, h], score`` in original
pixels) and, with ``--draw DIR``, one PNG per image with the boxes and labels drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint from hvd-yolo train")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or a shard dir")
    parser.add_argument("--out", default="detections.json", help="COCO results json to write")
    parser.add_argument("--draw", metavar="DIR", help="write PNGs with boxes drawn into DIR")
    parser.add_argument("--size", type=int, help="input size (default: the training size)")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=100)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def iter_images(inputs: list[str]):
    """Yield ``(image_id, name, uint8 image [3,H,W])`` from files, folders or shard dirs."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    next_id = 0
    for item in inputs:
        path = Path(item)
        if (path / "manifest.json").is_file():
            from hvd_yolo.data.dataset import ShardDataset

            ds = ShardDataset(path)
            for i in range(len(ds)):
                s = ds[i]
                yield s["image_id"], s["name"], s["image"]
            continue
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if path.is_dir() else [path]
        if not files:
            raise SystemExit(f"detect: no images found in {path}")
        for f in files:
            if not f.is_file():
                raise SystemExit(f"detect: {f} does not exist")
            yield next_id, f.name, decode_image(read_file(str(f)), mode=ImageReadMode.RGB)
            next_id += 1


def run(args: argparse.Namespace) -> int:
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes

    from hvd_yolo.checkpoint import restore_model
    from hvd_yolo.data.transforms import letterbox
    from hvd_yolo.evaluate import detect_batch

    model, state = restore_model(args.checkpoint)
    size = args.size or state["config"]["input"]["size"]
    names, category_ids = state["class_names"], state.get("category_ids")
    results, count = [], 0
    draw_dir = Path(args.draw) if args.draw else None
    if draw_dir:
        draw_dir.mkdir(parents=True, exist_ok=True)
    for image_id, name, image in iter_images(args.inputs):
        lb, _, meta = letterbox(image, None, size)
        meta["image_id"] = image_id
        dets = detect_batch(model, lb[None].float() / 255, [meta], args.conf, args.iou,
                            args.max_det, category_ids)
        results += dets
        count += 1
        if draw_dir:
            to_cls = {cid: i for i, cid in enumerate(category_ids)} if category_ids else None
            boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                   d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            labels = [f"{names[to_cls[d['category_id']] if to_cls else d['category_id']]} "
                      f"{d['score']:.2f}" for d in dets]
            drawn = draw_bounding_boxes(image, boxes, labels, colors="yellow", width=2)
            write_png(drawn, str(draw_dir / f"{Path(name).stem}.png"))
    Path(args.out).write_text(json.dumps(results))
    print(f"{count} images, {len(results)} detections -> {args.out}"
          + (f"; drawings in {draw_dir}" if draw_dir else ""))
    return 0
