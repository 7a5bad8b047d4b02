"""Guarded outputs: a command writes only new files, or files of the kind it wrote before.

Every path a command writes (``--json``, ``eval --results``, ``train --timeline``,
``detect --out``) passes :func:`guard_output` before any work starts. It refuses, naming the
option and the path: a folder; one of the command's inputs (the same file, hard links
included, or a path inside an input folder); a file inside a shard dataset (next to its
``manifest.json``) or a training run's ``checkpoints/``; and an existing file that is not what
the option writes (an earlier ``--json`` is JSON, an earlier ``--results`` a list of
detections, an earlier timeline Horovod's JSON event list). Standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

# How much of an existing file is read to recognise it.
_SNIFF_BYTES = 1 << 16


class OutputError(ValueError):
    """An output path that would replace an input or a file the command did not write."""


def _read_json(path: Path) -> object:
    try:
        if path.stat().st_size > 256 << 20:  # no JSON output of hvd-yolo is this large
            return _NOT_JSON
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return _NOT_JSON


_NOT_JSON = object()


def is_json(path: Path) -> bool:
    """An earlier ``--json`` output: a JSON object (the figures of a command)."""
    return isinstance(_read_json(path), dict)


def is_detections(path: Path) -> bool:
    """An earlier COCO results file (``eval --results``, ``detect --out``): a JSON list of
    detections, possibly empty."""
    data = _read_json(path)
    return isinstance(data, list) and all(
        isinstance(d, dict) and {"image_id", "bbox", "score"} <= set(d) for d in data)


def is_timeline(path: Path) -> bool:
    """An earlier Horovod timeline: a JSON event list (``[`` then ``{"name": ..., "ph": ...}``
    records; a killed run leaves it unterminated)."""
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    text = head.lstrip()
    return text.startswith("[") and (text[1:].strip() in ("", "]") or '"ph"' in text)


def _dataset_of(path: Path) -> Path | None:
    """The shard dataset or checkpoints folder ``path`` would be written into, else None."""
    parent = path.parent
    if (parent / "manifest.json").is_file():
        return parent
    if parent.name == "checkpoints" and (parent / "last.pt").exists():
        return parent
    return None


def _is_inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def input_paths(values: Iterable[object]) -> list[Path]:
    """The existing files and folders among ``values`` (a command's arguments)."""
    found = []
    for v in values:
        items = v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, str) and item and item != "-":
                p = Path(item)
                try:
                    if p.exists():
                        found.append(p)
                except OSError:
                    continue
    return found


def guard_output(path: str | os.PathLike[str], option: str, earlier: Callable[[Path], bool],
                 inputs: Iterable[Path] = (), what: str = "an earlier output of this option"
                 ) -> Path:
    """``path`` if the command may write it, else :class:`OutputError` naming ``option``.

    ``earlier(path)`` says whether an existing file is what this option wrote before;
    ``inputs`` are the command's input files and folders (never written, nor written into).
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{option} is empty: give a file name")
    p = Path(text)
    if p.is_dir():
        raise OutputError(f"{option} {p} is a folder: give a file name")
    target = p.resolve()
    for inp in inputs:
        src = inp.resolve()
        same = p.exists() and inp.exists() and os.path.samefile(p, inp)
        if same or (src.is_dir() and _is_inside(target, src)):
            raise OutputError(f"{option} {p} would write over the input {inp}: give a new file "
                              "outside the inputs (nothing was written)")
    owner = _dataset_of(target)
    if owner is not None:
        kind = "training checkpoints" if owner.name == "checkpoints" else "shard dataset"
        raise OutputError(f"{option} {p} is inside the {kind} {owner}: give a file outside it "
                          "(nothing was written)")
    if p.exists() and not earlier(p):
        raise OutputError(f"{option} {p} exists and is not {what}: give a new file, or move "
                          "that one away (nothing was written)")
    return p
