"""Read and write Darknet ``.weights`` files (``yolov3.weights``, ``darknet53.conv.74`` ...).

Format (little-endian): a header of int32 ``major, minor, revision`` and the images-seen
counter (int64 when ``major * 10 + minor >= 2``, else int32), then float32 values for each
convolutional layer in cfg order: with batch norm ``beta, gamma, running_mean, running_var``,
without it ``bias``; then the conv weights ``[out, in, k, k]``. A partial file (Darknet's
``partial`` command with cutoff ``n``) holds the convs of cfg layers ``0 .. n-1``:
``darknet53.conv.74`` (52 convs) and ``yolov3-tiny.conv.15`` (9 convs).

Loading checks that the file is consumed exactly: a short or long file is an error that gives
the expected and actual float counts (and, where it can tell, what the file looks like).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hvd_yolo.model.yolov3 import ConvLayer, YOLOv3

DEFAULT_VERSION = (0, 2, 0)  # what Darknet writes: int64 images-seen counter


@dataclass(frozen=True)
class DarknetHeader:
    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_is_int64(self) -> bool:
        return _seen_is_int64(self.major, self.minor)

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_int64 else 4)


def _seen_is_int64(major: int, minor: int) -> bool:
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def _conv_float_count(layer: ConvLayer) -> int:
    n_out = layer.conv.out_channels
    return layer.conv.weight.numel() + n_out * (4 if layer.bn is not None else 1)


def darknet_float_count(model: YOLOv3, cutoff: int | None = None) -> int:
    """Number of float32 values a ``.weights`` file holds for cfg layers ``0 .. cutoff-1``."""
    return sum(_conv_float_count(c) for c in model.conv_layers(cutoff))


def read_header(path: str | Path) -> DarknetHeader:
    """Only the header of a ``.weights`` file."""
    with open(path, "rb") as f:
        return _read_header(f, Path(path))


def _read_header(f, path: Path) -> DarknetHeader:
    head = f.read(12)
    if len(head) < 12:
        raise ValueError(f"{path}: {len(head)} bytes, too short for a Darknet .weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(head, dtype="<i4"))
    wide = _seen_is_int64(major, minor)
    raw = f.read(8 if wide else 4)
    if len(raw) < (8 if wide else 4):
        raise ValueError(f"{path}: truncated header (version {major}.{minor}.{revision})")
    seen = int(np.frombuffer(raw, dtype="<i8" if wide else "<i4")[0])
    return DarknetHeader(major, minor, revision, seen)


def _head_float_count(layer: ConvLayer, num_anchors: int, classes: int) -> int:
    """Floats of a detection conv (bias + 1x1 weights) for ``classes`` classes."""
    k = layer.conv.kernel_size[0] * layer.conv.kernel_size[1]
    return num_anchors * (5 + classes) * (layer.conv.in_channels * k + 1)


def classes_in_file(model: YOLOv3, actual: int) -> int | None:
    """The class count for which a full file of ``model``'s layout holds ``actual`` floats
    (only the detection convs depend on it), or None when no class count fits."""
    heads = [m for m in model.conv_layers() if m.bn is None]
    rest = darknet_float_count(model) - sum(_conv_float_count(h) for h in heads)
    per_class = sum(_head_float_count(h, model.num_anchors, 1) - _head_float_count(
        h, model.num_anchors, 0) for h in heads)
    base = rest + sum(_head_float_count(h, model.num_anchors, 0) for h in heads)
    if actual > base and (actual - base) % per_class == 0:
        return (actual - base) // per_class
    return None


def _describe_mismatch(model: YOLOv3, cutoff: int | None, actual: int) -> str:
    """Say what a file with ``actual`` floats probably is, to help the user pick the fix."""
    hints = []
    full, backbone = darknet_float_count(model), darknet_float_count(model, model.backbone_cutoff)
    if cutoff is None and actual == backbone:
        hints.append(f"this is a backbone-only file (cfg layers 0..{model.backbone_cutoff - 1}): "
                     "load it with backbone=True (--backbone)")
    elif cutoff is not None and actual == full:
        hints.append("this is a full-model file: load it without backbone/cutoff")
    elif cutoff is None and (classes := classes_in_file(model, actual)) is not None:
        hints.append(f"it matches {model.name} with {classes} classes (this model has "
                     f"{model.num_classes}): build the model with that class count, load only "
                     "the backbone, or start training from it (model.weights keeps every layer "
                     "but the detection convs)")
    if not hints:
        hints.append("check that the file was saved from the same architecture "
                     f"({model.name}) and is not truncated")
    return "; ".join(hints)


def load_darknet_weights(
    model: YOLOv3,
    path: str | Path,
    cutoff: int | None = None,
    backbone: bool = False,
) -> DarknetHeader:
    """Load a ``.weights`` file into ``model`` (in place) and return its header.

    ``backbone=True`` loads a backbone-only file (``darknet53.conv.74`` for YOLOv3,
    ``yolov3-tiny.conv.15`` for tiny); ``cutoff=n`` loads a partial file of cfg layers
    ``0 .. n-1``. The rest of the model is left as it is. Raises ``ValueError`` unless the file
    holds exactly the expected number of floats.
    """
    path = Path(path)
    if backbone:
        if cutoff is not None and cutoff != model.backbone_cutoff:
            raise ValueError(f"backbone=True means cutoff={model.backbone_cutoff}, got {cutoff}")
        cutoff = model.backbone_cutoff
    convs = model.conv_layers(cutoff)
    expected = darknet_float_count(model, cutoff)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        payload = f.read()
    if len(payload) % 4:
        raise ValueError(f"{path}: {len(payload)} bytes after the header is not a whole number "
                         "of float32 values; the file is corrupt or truncated")
    actual = len(payload) // 4
    if actual != expected:
        what = "all layers" if cutoff is None else f"cfg layers 0..{cutoff - 1}"
        raise ValueError(
            f"{path}: expected {expected} floats for {model.name} ({model.num_classes} classes, "
            f"{len(convs)} conv layers, {what}), the file holds {actual} "
            f"({'too short' if actual < expected else 'too long'} by {abs(actual - expected)}); "
            + _describe_mismatch(model, cutoff, actual))
    values = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
    pos = 0

    def take(dst: torch.Tensor) -> None:
        nonlocal pos
        n = dst.numel()
        dst.copy_(values[pos:pos + n].view_as(dst))
        pos += n

    with torch.no_grad():
        for layer in convs:
            if layer.bn is not None:
                for t in (layer.bn.bias, layer.bn.weight, layer.bn.running_mean,
                          layer.bn.running_var):
                    take(t)
            else:
                take(layer.conv.bias)
            take(layer.conv.weight)
    assert pos == actual
    return header


def save_darknet_weights(
    model: YOLOv3,
    path: str | Path,
    cutoff: int | None = None,
    seen: int = 0,
    version: tuple[int, int, int] = DEFAULT_VERSION,
) -> int:
    """Write ``model`` (or cfg layers ``0 .. cutoff-1``) as a Darknet ``.weights`` file.

    Returns the number of floats written. ``version`` picks the header layout (``(0, 1, 0)``
    writes the old int32 images-seen counter).
    """
    major, minor, revision = version
    parts = [np.asarray(version, dtype="<i4").tobytes(),
             np.asarray([seen], dtype="<i8" if _seen_is_int64(major, minor) else "<i4").tobytes()]
    n = 0
    with torch.no_grad():
        for layer in model.conv_layers(cutoff):
            tensors = ([layer.bn.bias, layer.bn.weight, layer.bn.running_mean,
                        layer.bn.running_var] if layer.bn is not None else [layer.conv.bias])
            for t in (*tensors, layer.conv.weight):
                arr = t.detach().cpu().to(torch.float32).numpy().astype("<f4").ravel()
                parts.append(arr.tobytes())
                n += arr.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(path)
    return n


@dataclass(frozen=True)
class PretrainedLoad:
    """What ``load_pretrained`` did: the file's kind, the cfg layers (convs) it loaded and the
    ones left as initialised."""

    path: str
    kind: str  # "full", "backbone" or "classes" (a full file of another class count)
    kept: tuple[int, ...]
    reinitialised: tuple[int, ...]
    file_classes: int
    header: DarknetHeader

    def text(self, model_classes: int) -> str:
        kept = _ranges(self.kept)
        if self.kind == "full":
            return f"model.weights {self.path}: loaded every layer ({len(self.kept)} convs)"
        why = (f"backbone-only file: cfg layers {kept} ({len(self.kept)} convs)"
               if self.kind == "backbone" else
               f"{self.file_classes}-class file for a {model_classes}-class model: kept "
               f"{len(self.kept)} convs (cfg layers {kept})")
        return (f"model.weights {self.path}: {why}; re-initialised {len(self.reinitialised)} "
                f"convs (cfg layers {_ranges(self.reinitialised)})")


def _ranges(indices: tuple[int, ...]) -> str:
    """``0-3, 5, 7-9`` for sorted indices."""
    parts: list[str] = []
    for i in indices:
        if parts and parts[-1][1] == i - 1:
            parts[-1] = (parts[-1][0], i)
        else:
            parts.append((i, i))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def load_pretrained(model: YOLOv3, path: str | Path) -> PretrainedLoad:
    """Start ``model`` from any Darknet file of its layout, told apart by its size.

    A full file of the model's class count loads every layer; a backbone-only file
    (``darknet53.conv.74``, ``yolov3-tiny.conv.15``) the backbone; a full file of another class
    count (the 80-class COCO weights for an N-class model) every layer except the detection
    convs, whose outputs depend on the class count (they keep their initialisation). Anything
    else raises ``ValueError`` saying what the file looks like.
    """
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        payload = f.read()
    actual = len(payload) // 4
    convs = [(i, m) for i, m in enumerate(model.layers) if isinstance(m, ConvLayer)]
    full = darknet_float_count(model)
    if len(payload) % 4 == 0 and actual == full:
        load_darknet_weights(model, path)
        return PretrainedLoad(str(path), "full", tuple(i for i, _ in convs), (), model.num_classes,
                              header)
    backbone = darknet_float_count(model, model.backbone_cutoff)
    if len(payload) % 4 == 0 and actual == backbone:
        load_darknet_weights(model, path, backbone=True)
        kept = tuple(i for i, _ in convs if i < model.backbone_cutoff)
        return PretrainedLoad(str(path), "backbone", kept,
                              tuple(i for i, _ in convs if i >= model.backbone_cutoff), 0, header)
    classes = classes_in_file(model, actual) if len(payload) % 4 == 0 else None
    if classes is None:
        load_darknet_weights(model, path)  # raises, saying what the file looks like
        raise AssertionError("unreachable")  # pragma: no cover
    values = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
    pos, kept, skipped = 0, [], []
    with torch.no_grad():
        for i, layer in convs:
            if layer.bn is None:  # a detection conv: sized for the file's classes, skipped
                pos += _head_float_count(layer, model.num_anchors, classes)
                skipped.append(i)
                continue
            for t in (layer.bn.bias, layer.bn.weight, layer.bn.running_mean,
                      layer.bn.running_var, layer.conv.weight):
                t.copy_(values[pos:pos + t.numel()].view_as(t))
                pos += t.numel()
            kept.append(i)
    assert pos == actual
    return PretrainedLoad(str(path), "classes", tuple(kept), tuple(skipped), classes, header)


def start_from_weights(model: YOLOv3, path: str | Path) -> str:
    """``model.weights``: ``load_pretrained``, returning the line that says what was kept and
    re-initialised; a file that does not fit raises ``ConfigError`` naming the key."""
    from hvd_yolo.config import ConfigError

    try:
        return load_pretrained(model, path).text(model.num_classes)
    except OSError as e:
        raise ConfigError(f"model.weights={path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"model.weights: {e}") from None
