"""Read YOLO txt, COCO json and Pascal VOC xml datasets into a plan of source items.

A reader only parses annotations and finds the image files; it does not open images. Each input
becomes a ``SourceItem`` (sorted by name) with its boxes in source units, or with the ``Issue``
that makes it unusable (malformed label, unknown class, duplicate name, missing image...), so
the converter can skip and report it (or stop, with ``--strict``) in a deterministic order.
Problems that make the whole source unusable raise ``ConversionError``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# Recognised as images but not storable (the reader decodes JPEG/PNG bytes): reported, skipped.
OTHER_IMAGE_EXTS = (".bmp", ".gif", ".tif", ".tiff", ".webp", ".heic", ".avif")
NAMES_FILES = ("data.yaml", "dataset.yaml", "classes.txt", "obj.names", "classes.names")


class ConversionError(Exception):
    """The source (or the options) cannot be converted; the message says what to do."""


@dataclass
class Issue:
    """One problem: ``kind`` is ``skipped`` (whole item), ``clipped`` or ``dropped`` (one box)."""

    item: str
    file: str
    line: int | None
    reason: str
    kind: str = "skipped"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def message(self) -> str:
        return f"{self.where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "file": self.file, "line": self.line, "reason": self.reason,
                "kind": self.kind}


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float64)


@dataclass
class SourceItem:
    """One input image with its annotations in source units (not yet checked against pixels)."""

    name: str  # path relative to the image folder (posix); unique among written items
    image: str | None  # absolute path of the image file
    label: str | None  # annotation file (relative to the source root), for messages
    image_id: int = 0
    boxes: np.ndarray = field(default_factory=_empty_boxes)  # xyxy (normalised or pixels)
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    refs: list[tuple[int | None, str]] = field(default_factory=list)  # (line, prefix) per box
    units: str = "pixels"  # or "normalized" (YOLO)
    declared_size: tuple[int, int] | None = None  # (width, height) from the annotation
    error: Issue | None = None


@dataclass
class SourcePlan:
    """What a reader found: class names, items sorted by name, and notes for the report."""

    format: str
    root: str
    image_root: str
    annotation: str | None
    class_names: list[str]
    category_ids: list[int]
    items: list[SourceItem]
    notes: list[str] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _list_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursive, hidden ones excluded) whose suffix is in ``exts``."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        if p.suffix.lower() in exts and p.is_file():
            out.append(p)
    return sorted(out)


def _finish(items: list[SourceItem], keep_ids: bool = False) -> list[SourceItem]:
    """Sort items by name and give them ids 1..n (unless the source has its own ids)."""
    items.sort(key=lambda it: (it.name, it.label or ""))
    if not keep_ids:
        for i, it in enumerate(items):
            it.image_id = i + 1
    return items


def load_names(path: str | Path) -> list[str]:
    """Class names from a YOLO ``data.yaml`` (``names`` list or {id: name}) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"names file {path} not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConversionError(f"{path}: not valid YAML ({e})") from e
        names = data.get("names") if isinstance(data, dict) else data
        if isinstance(names, dict):
            keys = sorted(names)
            if keys != list(range(len(keys))):
                raise ConversionError(f"{path}: names keys must be 0..{len(keys) - 1}, got {keys}")
            names = [names[k] for k in keys]
        if not isinstance(names, list) or not names:
            raise ConversionError(f"{path}: expected a `names:` list or mapping of class names")
        if isinstance(data, dict) and "nc" in data and data["nc"] != len(names):
            raise ConversionError(f"{path}: nc is {data['nc']} but names lists {len(names)}")
    else:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not names:
            raise ConversionError(f"{path}: no class names (one per line expected)")
    names = [str(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"{path}: duplicate class names {dup}")
    return names


# ----------------------------------------------------------------------------- YOLO txt


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
    images = _list_files(image_root, IMAGE_EXTS + OTHER_IMAGE_EXTS)
    labels = [p for p in _list_files(label_root, (".txt",))
              if not (names_file and p.resolve() == names_file.resolve())]
    if not images and not labels:
        raise ConversionError(f"{root}: no images in {image_root} and no labels in {label_root}")
    img_by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        img_by_stem[_rel(p.with_suffix(""), image_root)].append(p)
    lab_by_stem = {_rel(p.with_suffix(""), label_root): p for p in labels}
    items: list[SourceItem] = []
    notes: list[str] = []
    label_src = label_root.relative_to(root) if label_root.is_relative_to(root) else label_root
    for stem in sorted(set(img_by_stem) | set(lab_by_stem)):
        imgs, lab = img_by_stem.get(stem, []), lab_by_stem.get(stem)
        lab_rel = _rel(lab, root) if lab else f"{label_src}/{stem}.txt"
        if not imgs:
            items.append(SourceItem(name=_rel(lab, label_root), image=None, label=lab_rel,
                                    error=Issue(_rel(lab, label_root), lab_rel, None,
                                                f"label file has no image (looked for "
                                                f"{_rel(image_root, root)}/{stem}"
                                                f"{{{','.join(IMAGE_EXTS)}}})")))
            continue
        if len(imgs) > 1:
            others = ", ".join(_rel(p, image_root) for p in imgs)
            for p in imgs:
                items.append(SourceItem(name=_rel(p, image_root), image=str(p), label=lab_rel,
                                        error=Issue(_rel(p, image_root), _rel(p, root), None,
                                                    f"duplicate image name: {others} would share "
                                                    f"{lab_rel}; rename or remove one")))
            continue
        img = imgs[0]
        item = SourceItem(name=_rel(img, image_root), image=str(img), label=lab_rel,
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
                      class_names, list(range(len(class_names))), _finish(items), notes)


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
            bad = next(v for v in parts if not _is_float(v))
            item.error = Issue(item.name, rel, lineno, f"non-numeric value {bad!r}: {raw.strip()!r}")
            return
        c = values[0]
        if not math.isfinite(c) or c != int(c):
            item.error = Issue(item.name, rel, lineno, f"class id {parts[0]!r} is not an integer")
            return
        c = int(c)
        if c < 0 or (class_names is not None and c >= len(class_names)):
            src = _rel(names_file, root) if names_file else "the class list"
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


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- COCO json


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
            listing = ", ".join(_rel(c, source) for c in cands)
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
) -> SourcePlan:
    """A COCO ``instances`` json + image folder; keeps category ids and ``iscrowd``."""
    ann_path, image_root = find_coco_files(source, annotations, images)
    root = Path(source).resolve()
    root = root if root.is_dir() else ann_path.parent
    rel_ann = _rel(ann_path, root)
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
    unlisted = sum(1 for p in _list_files(image_root, IMAGE_EXTS) if str(p.resolve()) not in listed)
    if unlisted:
        notes.append(f"{unlisted} image files in {image_root} are not in {ann_path.name} "
                     "(not converted)")
    items = _finish(items, keep_ids=True)
    return SourcePlan("coco", str(root), str(image_root), str(ann_path),
                      [cats[c] for c in category_ids], category_ids, items, notes)


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


# ----------------------------------------------------------------------------- Pascal VOC


@dataclass
class _Node:
    tag: str
    line: int
    text: str = ""
    children: list[_Node] = field(default_factory=list)

    def find(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[_Node]:
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str) -> str | None:
        node = self.find(tag)
        return node.text if node is not None else None


def parse_xml(data: bytes) -> _Node:
    """A small element tree with line numbers (expat); raises ``expat.ExpatError``."""
    parser = expat.ParserCreate()
    stack: list[tuple[_Node, list[str]]] = []
    root: list[_Node] = []

    def start(tag: str, _attrs: Any) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        if stack:
            stack[-1][0].children.append(node)
        else:
            root.append(node)
        stack.append((node, []))

    def end(_tag: str) -> None:
        node, text = stack.pop()
        node.text = "".join(text).strip()

    def chars(text: str) -> None:
        if stack:
            stack[-1][1].append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.Parse(data, True)
    return root[0]


def read_voc(
    source: str | Path,
    names: str | Path | list[str] | None = None,
    split: str | None = None,
    images: str | Path | None = None,
) -> SourcePlan:
    """``Annotations/*.xml`` + ``JPEGImages/`` (VOCdevkit), or a folder of .xml + images."""
    root = Path(source).resolve()
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    devkit = (root / "Annotations").is_dir()
    xml_root = root / "Annotations" if devkit else root
    image_root = Path(images).resolve() if images else (root / "JPEGImages" if devkit else root)
    if not image_root.is_dir():
        raise ConversionError(f"{image_root}: image folder not found (VOC layout: Annotations/ "
                              "and JPEGImages/; or pass --images DIR)")
    items: list[SourceItem] = []
    if split is not None:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise ConversionError(f"{split_file}: split file not found")
        ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
        xmls = []
        for i in ids:
            p = xml_root / f"{i}.xml"
            if p.is_file():
                xmls.append(p)
            else:
                items.append(SourceItem(name=i, image=None, label=_rel(p, root), error=Issue(
                    i, _rel(split_file, root), None, f"{_rel(p, root)} listed in the split "
                    "but not found")))
    else:
        xmls = _list_files(xml_root, (".xml",))
    fixed_names = None
    if isinstance(names, list):
        fixed_names = [str(n) for n in names]
    elif names is not None:
        fixed_names = load_names(names)
    parsed: list[tuple[SourceItem, list[tuple[str, int]]]] = []
    claimed: dict[str, str] = {}
    for xml in xmls:
        item, objnames = _parse_voc_xml(xml, root, image_root, devkit)
        if item.error is None and item.image is not None:
            key = str(Path(item.image).resolve())
            if key in claimed:
                item.error = Issue(item.name, item.label or "", None, f"duplicate image name: "
                                   f"{item.name} is also annotated by {claimed[key]}")
            else:
                claimed[key] = item.label or ""
        parsed.append((item, objnames))
    if not xmls and not items:
        found = _list_files(image_root, IMAGE_EXTS)
        raise ConversionError(f"{xml_root}: no .xml annotation files found"
                              + (f" ({len(found)} images without annotations)" if found else ""))
    class_names = fixed_names or sorted({n for it, objs in parsed if it.error is None
                                         for n, _ in objs})
    index = {n: i for i, n in enumerate(class_names)}
    for item, objs in parsed:
        if item.error is None:
            for n, line in objs:
                if n not in index:
                    item.error = Issue(item.name, item.label or "", line, f"unknown class name "
                                       f"{n!r} (known: {', '.join(class_names)})")
                    break
            else:
                item.classes = np.array([index[n] for n, _ in objs], np.int64)
        items.append(item)
    if split is None:
        referenced = {str(Path(it.image).resolve()) for it, _ in parsed if it.image}
        for p in _list_files(image_root, IMAGE_EXTS + OTHER_IMAGE_EXTS):
            if str(p.resolve()) not in referenced:
                name = _rel(p, image_root)
                hint = f"Annotations/{p.stem}.xml" if devkit else f"{p.stem}.xml"
                items.append(SourceItem(name=name, image=str(p), label=None, error=Issue(
                    name, _rel(p, root), None, f"no annotation file refers to this image "
                    f"(expected {hint})")))
    return SourcePlan("voc", str(root), str(image_root), None, class_names,
                      list(range(len(class_names))), _finish(items))


def _parse_voc_xml(
    xml: Path, root: Path, image_root: Path, devkit: bool
) -> tuple[SourceItem, list[tuple[str, int]]]:
    rel = _rel(xml, root)
    item = SourceItem(name=_rel(xml.with_suffix(""), root), image=None, label=rel)
    try:
        tree = parse_xml(xml.read_bytes())
    except expat.ExpatError as e:
        item.error = Issue(item.name, rel, e.lineno, f"malformed XML ({expat.errors.messages[e.code]})")
        return item, []
    except OSError as e:
        item.error = Issue(item.name, rel, None, f"cannot read ({e})")
        return item, []
    if tree.tag != "annotation":
        item.error = Issue(item.name, rel, tree.line, f"root element is <{tree.tag}>, expected "
                           "<annotation> (not a Pascal VOC file)")
        return item, []
    folder = image_root if devkit else xml.parent
    fname = (tree.findtext("filename") or "").strip()
    exts = IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)
    cands = ([folder / fname] if fname else []) + [folder / (xml.stem + e) for e in exts]
    img = next((c for c in cands if c.is_file()), None)
    if img is None:
        item.error = Issue(item.name, rel, None, f"image not found (filename {fname!r}; looked in "
                           f"{_rel(folder, root) or '.'})")
        return item, []
    item.image = str(img)
    item.name = _rel(img, image_root)
    size = tree.find("size")
    if size is not None:
        try:
            w, h = int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))
            if w > 0 and h > 0:
                item.declared_size = (w, h)
        except ValueError:
            item.error = Issue(item.name, rel, size.line, "non-numeric <size> width/height")
            return item, []
    boxes, difficult, refs, objnames = [], [], [], []
    for obj in tree.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            item.error = Issue(item.name, rel, obj.line, "<object> without a <name>")
            return item, []
        bb = obj.find("bndbox")
        if bb is None:
            item.error = Issue(item.name, rel, obj.line, f"<object> {name!r} has no <bndbox>")
            return item, []
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            node = bb.find(tag)
            if node is None or not _is_float(node.text):
                line = node.line if node is not None else bb.line
                item.error = Issue(item.name, rel, line, f"<{tag}> of {name!r} is missing or "
                                   f"non-numeric ({node.text if node is not None else None!r})")
                return item, []
            coords.append(float(node.text))
        diff = (obj.findtext("difficult") or "0").strip()
        # VOC pixel coordinates are 1-based and inclusive: pixel k spans [k-1, k].
        boxes.append((coords[0] - 1, coords[1] - 1, coords[2], coords[3]))
        difficult.append(1 if diff not in ("", "0") else 0)
        refs.append((bb.line, f"object {name!r}: "))
        objnames.append((name, obj.line))
    item.boxes = np.array(boxes, np.float64).reshape(-1, 4)
    item.difficult = np.array(difficult, np.uint8)
    item.iscrowd = np.zeros(len(boxes), np.uint8)
    item.refs = refs
    return item, objnames
