"""YOLO txt datasets (images/ + labels/, class names from data.yaml or a names file).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from hvd_yolo.shards.sources.common import (
    IMAGE_EXTS,
    NAMES_FILES,
    OTHER_IMAGE_EXTS,
    ConversionError,
    Issue,
    SourceItem,
    SourcePlan,
    finish_items,
    is_float,
    list_files,
    load_names,
    rel_name,
)


def read_yolo(
    source: str | Path,
    names: str | Path | list[str] | None = None,
    allow_missing_labels: bool = False,
) -> SourcePlan:
    """``SOURCE/images/**`` + ``SOURCE/labels/**.txt`` (``class cx cy w h``, normalised)."""
    root = Path(source).resolve()
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    if (root / "images").is_dir():
        image_root, label_root = root / "images", root / "labels"
    elif "images" in root.parts:  # SOURCE is .../images/train: labels in .../labels/train
        i = len(root.parts) - 1 - root.parts[::-1].index("images")
        image_root, label_root = root, Path(*root.parts[:i], "labels", *root.parts[i + 1:])
    else:
        raise ConversionError(f"{root}: expected a YOLO dataset with images/ and labels/ folders")
    if not label_root.is_dir():
        raise ConversionError(f"{label_root}: labels folder not found (YOLO layout: images/ and "
                              "labels/ side by side, one .txt per image)")
    class_names, names_file = _yolo_names(root, label_root, names)
    images = list_files(image_root, IMAGE_EXTS + OTHER_IMAGE_EXTS)
    labels = [p for p in list_files(label_root, (".txt",))
              if not (names_file and p.resolve() == names_file.resolve())]
    if not images and not labels:
        raise ConversionError(f"{root}: no images in {image_root} and no labels in {label_root}")
    img_by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        img_by_stem[rel_name(p.with_suffix(""), image_root)].append(p)
    lab_by_stem = {rel_name(p.with_suffix(""), label_root): p for p in labels}
    items: list[SourceItem] = []
    notes: list[str] = []
    label_src = label_root.relative_to(root) if label_root.is_relative_to(root) else label_root
    for stem in sorted(set(img_by_stem) | set(lab_by_stem)):
        imgs, lab = img_by_stem.get(stem, []), lab_by_stem.get(stem)
        lab_rel = rel_name(lab, root) if lab else f"{label_src}/{stem}.txt"
        if not imgs:
            items.append(SourceItem(name=rel_name(lab, label_root), image=None, label=lab_rel,
                                    error=Issue(rel_name(lab, label_root), lab_rel, None,
                                                f"label file has no image (looked for "
                                                f"{rel_name(image_root, root)}/{stem}"
                                                f"{{{','.join(IMAGE_EXTS)}}})")))
            continue
        if len(imgs) > 1:
            others = ", ".join(rel_name(p, image_root) for p in imgs)
            for p in imgs:
                items.append(SourceItem(name=rel_name(p, image_root), image=str(p), label=lab_rel,
                                        error=Issue(rel_name(p, image_root), rel_name(p, root), None,
                                                    f"duplicate image name: {others} would share "
                                                    f"{lab_rel}; rename or remove one")))
            continue
        img = imgs[0]
        item = SourceItem(name=rel_name(img, image_root), image=str(img), label=lab_rel,
                          units="normalized")
        if lab is None:
            if not allow_missing_labels:
                item.error = Issue(item.name, lab_rel, None,
                                   "label file missing (an image without objects needs an empty "
                                   ".txt; or pass --allow-missing-labels)")
        else:
            _parse_yolo_label(item, lab, lab_rel, class_names, names_file, root)
        items.append(item)
    if allow_missing_labels:
        n_missing = sum(1 for s in img_by_stem if s not in lab_by_stem)
        if n_missing:
            notes.append(f"{n_missing} images had no label file and were written without boxes "
                         "(--allow-missing-labels)")
    if class_names is None:
        top = max((int(it.classes.max()) for it in items if len(it.classes)), default=-1)
        class_names = [str(i) for i in range(top + 1)]
        notes.append("no names file found: class names are the class ids")
    return SourcePlan("yolo", str(root), str(image_root), str(names_file) if names_file else None,
                      class_names, list(range(len(class_names))), finish_items(items), notes)


def _yolo_names(
    root: Path, label_root: Path, names: str | Path | list[str] | None
) -> tuple[list[str] | None, Path | None]:
    if isinstance(names, list):
        return [str(n) for n in names], None
    if names is not None:
        return load_names(names), Path(names)
    for cand in [root / n for n in NAMES_FILES] + [label_root / "classes.txt",
                                                   root.parent / "data.yaml"]:
        if cand.is_file():
            try:
                return load_names(cand), cand
            except ConversionError:
                if cand.suffix == ".yaml" and cand.parent != root:
                    continue
                raise
    return None, None


def _parse_yolo_label(
    item: SourceItem,
    path: Path,
    rel: str,
    class_names: list[str] | None,
    names_file: Path | None,
    root: Path,
) -> None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        item.error = Issue(item.name, rel, None, f"cannot read label file ({e})")
        return
    boxes, classes, refs = [], [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 5:
            hint = "; segmentation polygons are not supported" if len(parts) > 5 else ""
            item.error = Issue(item.name, rel, lineno, f"line has {len(parts)} columns, expected "
                               f"5 (class cx cy w h){hint}: {raw.strip()!r}")
            return
        try:
            values = [float(v) for v in parts]
        except ValueError:
            bad = next(v for v in parts if not is_float(v))
            item.error = Issue(item.name, rel, lineno, f"non-numeric value {bad!r}: {raw.strip()!r}")
            return
        c = values[0]
        if not math.isfinite(c) or c != int(c):
            item.error = Issue(item.name, rel, lineno, f"class id {parts[0]!r} is not an integer")
            return
        c = int(c)
        if c < 0 or (class_names is not None and c >= len(class_names)):
            src = rel_name(names_file, root) if names_file else "the class list"
            item.error = Issue(item.name, rel, lineno, f"unknown class id {c} ({src} lists "
                               f"{len(class_names or [])} classes, ids 0..{len(class_names or []) - 1})")
            return
        cx, cy, w, h = values[1:]
        boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        classes.append(c)
        refs.append((lineno, ""))
    item.boxes = np.array(boxes, np.float64).reshape(-1, 4)
    item.classes = np.array(classes, np.int64)
    item.iscrowd = np.zeros(len(classes), np.uint8)
    item.difficult = np.zeros(len(classes), np.uint8)
    item.refs = refs
