"""Read YOLO txt, COCO json and Pascal VOC xml datasets into a plan of source items.

A reader only parses annotations and finds the image files; it does not open images. Each input
becomes a ``SourceItem`` (sorted by name) with its boxes in source units, or with the ``Issue``
that makes it unusable (malformed label, unknown class, duplicate name, missing image...), so
the converter can skip and report it (or stop, with ``--strict``) in a deterministic order.
Problems that make the whole source unusable raise ``ConversionError``.

This module: what every reader shares (items, issues, the plan, file listing, class names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def __post_init__(self) -> None:  # printable and JSON-safe: no undecodable bytes
        self.item, self.file = display_name(self.item), display_name(self.file)
        self.reason = display_name(self.reason)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def message(self) -> str:
        return f"{self.where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "file": self.file, "line": self.line, "reason": self.reason,
                "kind": self.kind}


def empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float64)


@dataclass
class SourceItem:
    """One input image with its annotations in source units (not yet checked against pixels)."""

    name: str  # path relative to the image folder (posix); unique among written items
    image: str | None  # absolute path of the image file
    label: str | None  # annotation file (relative to the source root), for messages
    image_id: int = 0
    boxes: np.ndarray = field(default_factory=empty_boxes)  # xyxy (normalised or pixels)
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


def rel_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def list_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """Entries under ``root`` (recursive, hidden ones excluded) whose suffix is in ``exts``:
    files, and anything else that is not a folder (a device, a broken link: the item reports
    what it is). A folder that cannot be listed is a ConversionError naming it."""
    import os

    def refuse(err: OSError) -> None:
        raise ConversionError(f"{err.filename}: cannot list it ({err.strerror or err}): fix its "
                              "permissions, or convert as a user who can read it")

    out = []
    for folder, dirs, files in os.walk(root, onerror=refuse):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in exts:
                out.append(Path(folder) / name)
    return sorted(out)


def display_name(name: str) -> str:
    """``name`` printable: bytes that are not UTF-8 (a file name from another encoding, which
    Python keeps as surrogates) shown as ``\\xNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def finish_items(items: list[SourceItem], keep_ids: bool = False) -> list[SourceItem]:
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


def is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
