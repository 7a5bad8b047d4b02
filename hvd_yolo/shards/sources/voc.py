"""Pascal VOC xml datasets (Annotations/ + JPEGImages/, an optional ImageSets list), read with a
small expat XML tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import numpy as np

from hvd_yolo.shards.sources.common import (
    IMAGE_EXTS,
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
                items.append(SourceItem(name=i, image=None, label=rel_name(p, root), error=Issue(
                    i, rel_name(split_file, root), None, f"{rel_name(p, root)} listed in the split "
                    "but not found")))
    else:
        xmls = list_files(xml_root, (".xml",))
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
        found = list_files(image_root, IMAGE_EXTS)
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
        for p in list_files(image_root, IMAGE_EXTS + OTHER_IMAGE_EXTS):
            if str(p.resolve()) not in referenced:
                name = rel_name(p, image_root)
                hint = f"Annotations/{p.stem}.xml" if devkit else f"{p.stem}.xml"
                items.append(SourceItem(name=name, image=str(p), label=None, error=Issue(
                    name, rel_name(p, root), None, f"no annotation file refers to this image "
                    f"(expected {hint})")))
    return SourcePlan("voc", str(root), str(image_root), None, class_names,
                      list(range(len(class_names))), finish_items(items))


def _parse_voc_xml(
    xml: Path, root: Path, image_root: Path, devkit: bool
) -> tuple[SourceItem, list[tuple[str, int]]]:
    rel = rel_name(xml, root)
    item = SourceItem(name=rel_name(xml.with_suffix(""), root), image=None, label=rel)
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
                           f"{rel_name(folder, root) or '.'})")
        return item, []
    item.image = str(img)
    item.name = rel_name(img, image_root)
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
            if node is None or not is_float(node.text):
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
