"""COCO json datasets (instances_*.json + an image folder).
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hvd_yolo.shards.sources.common import (
    IMAGE_EXTS,
    ConversionError,
    Issue,
    SourceItem,
    SourcePlan,
    finish_items,
    list_files,
    rel_name,
)


def find_coco_files(
    source: str | Path, annotations: str | Path | None = None, images: str | Path | None = None
) -> tuple[Path, Path]:
    """Locate the ``instances_*.json`` and its image folder (COCO layouts), or explain."""
    source = Path(source).resolve()
    if annotations is not None:
        ann = Path(annotations).resolve()
    elif source.is_file():
        ann = source
    elif source.is_dir():
        cands = sorted(source.glob("annotations/instances_*.json")) or sorted(
            source.glob("instances_*.json")) or sorted(source.glob("annotations/*.json")) or sorted(
            source.glob("*.json"))
        if not cands:
            raise ConversionError(f"{source}: no COCO json found (looked for annotations/"
                                  "instances_*.json and *.json); pass --annotations FILE")
        if len(cands) > 1:
            listing = ", ".join(rel_name(c, source) for c in cands)
            raise ConversionError(f"{source}: several COCO json files ({listing}); choose one "
                                  "with --annotations FILE")
        ann = cands[0]
    else:
        raise ConversionError(f"{source}: no such file or directory")
    if not ann.is_file():
        raise ConversionError(f"{ann}: annotation file not found")
    if images is not None:
        img = Path(images).resolve()
        if not img.is_dir():
            raise ConversionError(f"{img}: image folder not found")
        return ann, img
    split = ann.stem.split("_", 1)[1] if ann.stem.startswith("instances_") else None
    base = source if source.is_dir() else ann.parent
    tried: list[Path] = []
    for d in (base, ann.parent.parent, ann.parent):
        for sub in ([split, f"images/{split}"] if split else []) + ["images", "JPEGImages"]:
            tried.append(d / sub)
    tried.append(ann.parent)
    for cand in tried:
        if cand.is_dir():
            return ann, cand
    raise ConversionError(f"{ann}: image folder not found (tried {', '.join(map(str, tried[:6]))}"
                          " ...); pass --images DIR")


def read_coco(
    source: str | Path,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    allow_absolute_paths: bool = False,
) -> SourcePlan:
    """A COCO ``instances`` json + image folder; keeps category ids and ``iscrowd``. A
    ``file_name`` that leads outside the image folder (``..``; an absolute path unless
    ``allow_absolute_paths``) is skipped with the reason."""
    ann_path, image_root = find_coco_files(source, annotations, images)
    root = Path(source).resolve()
    root = root if root.is_dir() else ann_path.parent
    rel_ann = rel_name(ann_path, root)
    try:
        data = json.loads(ann_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{ann_path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{ann_path}: expected a JSON object with images/annotations/"
                              "categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(f"{ann_path}: `{key}` missing or not a list (not a COCO "
                                  "instances file?)")
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise ConversionError(f"{ann_path}: category {c!r} needs an integer id and a name")
        if c["id"] in cats:
            raise ConversionError(f"{ann_path}: duplicate category id {c['id']}")
        cats[c["id"]] = str(c["name"])
    if not cats:
        raise ConversionError(f"{ann_path}: no categories")
    category_ids = sorted(cats)
    contiguous = {cid: i for i, cid in enumerate(category_ids)}
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in data["annotations"]:
        by_image[a.get("image_id") if isinstance(a, dict) else None].append(a)
    items: list[SourceItem] = []
    seen_ids: dict[int, str] = {}
    seen_names: dict[str, int] = {}
    for pos, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            name = f"<images[{pos}]>"
            items.append(SourceItem(name=name, image=None, label=rel_ann, error=Issue(
                name, rel_ann, None, f"images[{pos}] has no file_name: {im!r:.80}")))
            continue
        name = im["file_name"]
        item = SourceItem(name=name, image=str(image_root / name), label=rel_ann)
        items.append(item)
        outside = _outside(name, allow_absolute_paths)
        if outside:
            item.image = None
            item.error = Issue(name, rel_ann, None, f"file_name {name!r} {outside}")
            continue
        iid = im.get("id")
        if not isinstance(iid, int) or isinstance(iid, bool):
            item.error = Issue(name, rel_ann, None, f"image {name!r} has a non-integer id {iid!r}")
            continue
        item.image_id = iid
        if iid in seen_ids:
            item.error = Issue(name, rel_ann, None, f"duplicate image id {iid} (also "
                               f"{seen_ids[iid]!r})")
            continue
        seen_ids[iid] = name
        if name in seen_names:
            item.error = Issue(name, rel_ann, None, f"duplicate image name {name!r} (image ids "
                               f"{seen_names[name]} and {iid})")
            continue
        seen_names[name] = iid
        w, h = im.get("width"), im.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            item.declared_size = (w, h)
        _coco_boxes(item, by_image.get(iid, []), contiguous, cats, rel_ann)
    orphans = sum(len(v) for k, v in by_image.items() if k not in seen_ids)
    notes = []
    if orphans:
        notes.append(f"{orphans} annotations refer to image ids not in `images` and were ignored")
    if not items:
        raise ConversionError(f"{ann_path}: `images` is empty")
    listed = {str((image_root / it.name).resolve()) for it in items if it.image}
    unlisted = sum(1 for p in list_files(image_root, IMAGE_EXTS) if str(p.resolve()) not in listed)
    if unlisted:
        notes.append(f"{unlisted} image files in {image_root} are not in {ann_path.name} "
                     "(not converted)")
    items = finish_items(items, keep_ids=True)
    return SourcePlan("coco", str(root), str(image_root), str(ann_path),
                      [cats[c] for c in category_ids], category_ids, items, notes)


def _outside(name: str, allow_absolute: bool) -> str | None:
    """Why ``file_name`` leads outside the image folder, or None when it stays inside."""
    if "\0" in name or not name:
        return "is not a file name"
    if posixpath.isabs(name) or Path(name).is_absolute():
        return None if allow_absolute else ("is an absolute path, outside --images: refused "
                                            "(--allow-absolute-paths accepts it)")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return "leads outside --images ('..'): refused"
    return None


def _coco_boxes(
    item: SourceItem,
    anns: list[dict[str, Any]],
    contiguous: dict[int, int],
    cats: dict[int, str],
    rel_ann: str,
) -> None:
    boxes, classes, crowd, refs = [], [], [], []
    for a in anns:  # in the json's order
        aid = a.get("id")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            item.error = Issue(item.name, rel_ann, None, f"annotation id {aid}: bbox must be 4 "
                               f"numbers [x, y, width, height], got {bbox!r}")
            return
        cid = a.get("category_id")
        if cid not in contiguous:
            item.error = Issue(item.name, rel_ann, None, f"annotation id {aid}: unknown "
                               f"category_id {cid!r} (categories: {sorted(cats)})")
            return
        x, y, w, h = (float(v) for v in bbox)
        boxes.append((x, y, x + w, y + h))
        classes.append(contiguous[cid])
        crowd.append(1 if a.get("iscrowd") else 0)
        refs.append((None, f"annotation id {aid}: "))
    item.boxes = np.array(boxes, np.float64).reshape(-1, 4)
    item.classes = np.array(classes, np.int64)
    item.iscrowd = np.array(crowd, np.uint8)
    item.difficult = np.zeros(len(classes), np.uint8)
    item.refs = refs
