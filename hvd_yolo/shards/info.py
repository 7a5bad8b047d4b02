"""``hvd-yolo shards info``: counts, classes and image sizes of a shard directory, as text bars.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from hvd_yolo.shards.format import ShardError, check_dataset, load_manifest, read_index

_SIZE_BINS = (0, 128, 256, 384, 512, 640, 800, 1024, 1333, 2048, 4096)


def shard_info(root: str | Path) -> dict[str, Any]:
    """Counts, classes, boxes per class, image and box size statistics (no image decoded).
    Every count is taken from the shards' index tables, after the structural checks every
    reader applies (the manifest's checksum, its shard list, ``check_dataset``)."""
    root = Path(root)
    manifest = load_manifest(root)
    indexes = []
    for entry in manifest["shards"]:
        if not (root / entry["file"]).is_file():
            raise ShardError(f"{entry['file']}: listed in the manifest but missing from {root}")
        indexes.append(read_index(root / entry["file"]))
    check_dataset(root, manifest, indexes)
    names = list(manifest.get("class_names", []))
    per_class = np.zeros(len(names), np.int64)
    crowd = difficult = 0
    long_sides: list[np.ndarray] = []
    sizes: Counter[tuple[int, int]] = Counter()
    boxes_per_image: list[np.ndarray] = []
    areas: list[np.ndarray] = []
    shards = []
    for entry, idx in zip(manifest["shards"], indexes):
        per_class += np.bincount(idx.cls, minlength=len(names))[: len(names)]
        crowd += int(idx.iscrowd.sum())
        difficult += int(idx.difficult.sum())
        long_sides.append(idx.hw.max(axis=1) if idx.count else np.zeros(0, np.int64))
        sizes.update((int(w), int(h)) for h, w in idx.hw)
        boxes_per_image.append(np.diff(idx.box_offsets))
        areas.append((idx.xyxy[:, 2] - idx.xyxy[:, 0]) * (idx.xyxy[:, 3] - idx.xyxy[:, 1]))
        shards.append({"file": entry["file"], "count": idx.count, "boxes": len(idx.cls),
                       "bytes": int(idx.image_offsets[-1])})
    longs = np.concatenate(long_sides) if long_sides else np.zeros(0)
    hist, _ = np.histogram(longs, bins=[*_SIZE_BINS, np.inf])
    bpi = np.concatenate(boxes_per_image) if boxes_per_image else np.zeros(0)
    area = np.concatenate(areas) if areas else np.zeros(0)
    return {
        "root": str(root),
        "num_samples": sum(s["count"] for s in shards),
        "num_boxes": sum(s["boxes"] for s in shards),
        "num_shards": len(shards),
        "bytes": int(sum(s["bytes"] for s in shards)),
        "shards": shards,
        "classes": [
            {"id": i, "name": n, "source_id": manifest.get("category_ids", [None] * len(names))[i],
             "boxes": int(per_class[i])}
            for i, n in enumerate(names)
        ],
        "iscrowd": crowd,
        "difficult": difficult,
        "images_without_boxes": int((bpi == 0).sum()),
        "max_boxes_per_image": int(bpi.max()) if len(bpi) else 0,
        "box_area": {"small(<32^2)": int((area < 32**2).sum()),
                     "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
                     "large(>=96^2)": int((area >= 96**2).sum())},
        "long_side_histogram": [
            {"from": _SIZE_BINS[i], "to": (_SIZE_BINS[i + 1] if i + 1 < len(_SIZE_BINS) else None),
             "count": int(c)}
            for i, c in enumerate(hist)
        ],
        "common_sizes": [{"width": w, "height": h, "count": c} for (w, h), c in sizes.most_common(8)],
        "report": manifest.get("report", {}),
    }


def format_info(info: dict[str, Any], width: int = 40) -> str:
    """``shard_info`` as a text report with bar charts."""
    lines = [
        f"shard directory  {info['root']}",
        f"images           {info['num_samples']}  in {info['num_shards']} shards "
        f"({info['bytes'] / 2**20:.1f} MiB of encoded images)",
        f"boxes            {info['num_boxes']}  (iscrowd {info['iscrowd']}, difficult "
        f"{info['difficult']}; {info['images_without_boxes']} images without boxes; at most "
        f"{info['max_boxes_per_image']} per image)",
    ]
    rep = info.get("report") or {}
    if rep:
        lines.append(f"conversion       inputs {rep.get('inputs')} = written {rep.get('written')} "
                     f"+ skipped {rep.get('skipped')}; boxes clipped {rep.get('boxes_clipped')}, "
                     f"dropped {rep.get('boxes_dropped')}")
    lines += ["", "shards:"]
    lines += [f"  {s['file']}  {s['count']:>8} images  {s['boxes']:>9} boxes  "
              f"{s['bytes'] / 2**20:>9.1f} MiB" for s in info["shards"]]
    lines += ["", "boxes per class:"]
    lines += _bars([(f"{c['id']:>3} {c['name']}" + (f" (id {c['source_id']})"
                     if c.get("source_id") is not None else ""), c["boxes"])
                    for c in info["classes"]], width)
    lines += ["", "box area:"]
    lines += _bars(list(info["box_area"].items()), width)
    lines += ["", "image long side (pixels):"]
    lines += _bars([(f"{h['from']:>5}-{h['to'] if h['to'] else '':<5}", h["count"])
                    for h in info["long_side_histogram"]], width)
    lines += ["", "most common sizes (WxH):"]
    lines += _bars([(f"{s['width']}x{s['height']}", s["count"]) for s in info["common_sizes"]],
                   width)
    return "\n".join(lines)


def _bars(rows: Iterable[tuple[str, int]], width: int) -> list[str]:
    rows = list(rows)
    if not rows:
        return ["  (none)"]
    top = max(max(c for _, c in rows), 1)
    pad = max(len(k) for k, _ in rows)
    return [f"  {k:<{pad}} {c:>9} {'#' * round(width * c / top)}" for k, c in rows]
