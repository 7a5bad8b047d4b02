"""Read and write Darknet ``.cfg`` files for the two layouts hvd_yolo builds.

``read_cfg`` parses a cfg (``[net]``, ``[convolutional]``, ``[shortcut]``, ``[route]``,
``[upsample]``, ``[maxpool]``, ``[yolo]``) and matches its layer sequence against the yolov3 and
yolov3-tiny layouts of ``hvd_yolo.model.yolov3`` at the cfg's class count and anchors; anything
else (another layout, an option that changes the forward pass) is refused with
:class:`CfgError`, naming the file, the section and its line. ``cfg_text`` writes the cfg of a
built model, which Darknet and OpenCV's ``readNetFromDarknet`` read.

Anchors: a ``[yolo]`` section holds the full ``anchors`` list and a ``mask`` picking its own;
the model keeps them per output in output order (``[yolo]`` sections in cfg order: largest
stride first), in input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hvd_yolo.model.yolov3 import (
    ConvLayer,
    MaxPool,
    Route,
    Shortcut,
    Upsample,
    YoloLayer,
    YOLOv3,
    _yolov3_specs,
    _yolov3_tiny_specs,
)

SECTIONS = ("net", "convolutional", "shortcut", "route", "upsample", "maxpool", "yolo")
# Options whose value changes the forward pass: the only value the layouts support.
_FIXED = {
    "convolutional": {"groups": "1", "dilation": "1", "binary": "0", "xnor": "0",
                      "antialiasing": "0", "flipped": "0", "share_index": None, "deform": "0"},
    "shortcut": {"activation": "linear", "weights_type": "none"},
    "route": {"groups": "1", "group_id": "0"},
    "upsample": {"scale": "1"},
    "maxpool": {"maxpool_depth": "0", "antialiasing": "0", "out_channels": None},
    "yolo": {"scale_x_y": "1", "new_coords": "0"},
}
# Options that only steer Darknet's training or post-processing (read and ignored here).
_IGNORED = {
    "convolutional": {"filters", "size", "stride", "pad", "padding", "batch_normalize",
                      "activation", "stride_x", "stride_y", "stopbackward", "dontload",
                      "dontloadscales", "learning_rate", "train", "coordconv"},
    "shortcut": {"from"},
    "route": {"layers", "stopbackward"},
    "upsample": {"stride"},
    "maxpool": {"size", "stride", "padding", "stride_x", "stride_y"},
    "yolo": {"mask", "anchors", "classes", "num", "jitter", "ignore_thresh", "truth_thresh",
             "random", "max_delta", "counters_per_class", "label_smooth_eps", "iou_normalizer",
             "obj_normalizer", "cls_normalizer", "delta_normalizer", "iou_loss",
             "iou_thresh_kind", "beta_nms", "nms_kind", "resize", "focal_loss",
             "objectness_smooth", "iou_thresh", "map", "show_details", "uc_normalizer",
             "track_history_size", "sim_thresh", "dets_for_track", "dets_for_show",
             "track_ciou_norm", "embedding_layer", "rescore"},
}


class CfgError(ValueError):
    """A cfg that cannot be read or is not one of the supported layouts (names file and line)."""


@dataclass
class Section:
    """One ``[kind]`` section: its options as text and the line of each (1-based)."""

    kind: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, path: str, key: str | None = None) -> str:
        line = self.lines.get(key, self.line) if key else self.line
        return f"{path}: line {line}: [{self.kind}]"


@dataclass(frozen=True)
class CfgModel:
    """What a cfg describes, in ``build_model``'s terms."""

    name: str
    num_classes: int
    anchors: list[list[tuple[float, float]]]
    width: int
    height: int

    def build(self) -> YOLOv3:
        from hvd_yolo.model.yolov3 import build_model

        return build_model(self.name, self.num_classes, anchors=self.anchors)


def parse_cfg(text: str, path: str = "<cfg>") -> list[Section]:
    """The sections of a cfg, in order (``#``/``;`` comments and blank lines skipped)."""
    sections: list[Section] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise CfgError(f"{path}: line {n}: section header {line!r} has no closing ']'")
            kind = line[1:-1].strip().lower()
            if kind == "network":
                kind = "net"
            if kind not in SECTIONS:
                raise CfgError(f"{path}: line {n}: [{kind}] is not supported (hvd-yolo imports "
                               f"{', '.join('[' + s + ']' for s in SECTIONS)} in the yolov3 and "
                               "yolov3-tiny layouts)")
            sections.append(Section(kind, n))
            continue
        if "=" not in line:
            raise CfgError(f"{path}: line {n}: {line!r} is neither a [section] nor key=value")
        if not sections:
            raise CfgError(f"{path}: line {n}: {line!r} comes before the first [section]")
        key, value = (p.strip() for p in line.split("=", 1))
        sections[-1].options[key.lower()] = value
        sections[-1].lines[key.lower()] = n
    if not sections or sections[0].kind != "net":
        raise CfgError(f"{path}: the first section must be [net] (found "
                       f"{'[' + sections[0].kind + ']' if sections else 'none'})")
    return sections


def _int(sec: Section, path: str, key: str, default: int | None = None) -> int:
    value = sec.options.get(key)
    if value is None:
        if default is None:
            raise CfgError(f"{sec.where(path)} has no {key}=")
        return default
    try:
        return int(value)
    except ValueError:
        raise CfgError(f"{sec.where(path, key)}: {key}={value!r} is not an integer") from None


def _ints(sec: Section, path: str, key: str) -> list[int]:
    try:
        return [int(v) for v in sec.options.get(key, "").replace(" ", "").split(",") if v]
    except ValueError:
        raise CfgError(f"{sec.where(path, key)}: {key}={sec.options[key]!r} is not a list of "
                       "integers") from None


def _check_options(sec: Section, path: str) -> None:
    for key, value in sec.options.items():
        fixed = _FIXED.get(sec.kind, {})
        if key in fixed:
            want = fixed[key]
            if want is None or value.strip().lower() != want:
                need = f"; the yolov3 layouts need {key}={want}" if want else ""
                raise CfgError(f"{sec.where(path, key)}: {key}={value} is not supported{need}")
        elif key not in _IGNORED.get(sec.kind, set()):
            raise CfgError(f"{sec.where(path, key)}: unknown option {key}={value} (refused "
                           "rather than ignored: it may change the network)")


def _layer_spec(sec: Section, i: int, path: str, yolo_index: int) -> tuple:
    """The section as an absolute-index layer spec, comparable with the model's specs."""
    _check_options(sec, path)
    if sec.kind == "convolutional":
        size, stride = _int(sec, path, "size", 1), _int(sec, path, "stride", 1)
        for key in ("stride_x", "stride_y"):
            if _int(sec, path, key, stride) != stride:
                raise CfgError(f"{sec.where(path, key)}: {key} differs from stride={stride}")
        pad = size // 2 if _int(sec, path, "pad", 0) else _int(sec, path, "padding", 0)
        if pad != size // 2:
            raise CfgError(f"{sec.where(path)}: padding {pad} for size {size}; the layouts pad "
                           f"by size/2 = {size // 2} (pad=1)")
        bn = bool(_int(sec, path, "batch_normalize", 0))
        act = sec.options.get("activation", "logistic").lower()
        if act != ("leaky" if bn else "linear"):
            raise CfgError(f"{sec.where(path, 'activation')}: activation={act} with "
                           f"batch_normalize={int(bn)}; the layouts use "
                           f"{'leaky' if bn else 'linear'} there")
        return ("conv", _int(sec, path, "filters"), size, stride, bn)
    if sec.kind == "shortcut":
        src = _int(sec, path, "from")
        return ("shortcut", i + src if src < 0 else src)
    if sec.kind == "route":
        layers = _ints(sec, path, "layers")
        if not layers:
            raise CfgError(f"{sec.where(path)} has no layers=")
        return ("route", tuple(i + s if s < 0 else s for s in layers))
    if sec.kind == "upsample":
        return ("upsample", _int(sec, path, "stride", 2))
    if sec.kind == "maxpool":
        stride = _int(sec, path, "stride", 1)
        size = _int(sec, path, "size", stride)
        for key in ("stride_x", "stride_y"):
            if _int(sec, path, key, stride) != stride:
                raise CfgError(f"{sec.where(path, key)}: {key} differs from stride={stride}")
        if _int(sec, path, "padding", size - 1) != size - 1:
            raise CfgError(f"{sec.where(path, 'padding')}: padding must be size-1 = {size - 1}")
        return ("maxpool", size, stride)
    return ("yolo", yolo_index)


def _absolute(specs: list[tuple]) -> list[tuple]:
    out = []
    for i, s in enumerate(specs):
        if s[0] == "shortcut":
            s = ("shortcut", i + s[1])
        elif s[0] == "route":
            s = ("route", tuple(i + v if v < 0 else v for v in s[1]))
        out.append(s)
    return out


def _describe(spec: tuple | None) -> str:
    if spec is None:
        return "nothing (the network ends)"
    kind = spec[0]
    if kind == "conv":
        return (f"[convolutional] filters={spec[1]} size={spec[2]} stride={spec[3]} "
                f"batch_normalize={int(spec[4])}")
    if kind == "shortcut":
        return f"[shortcut] from layer {spec[1]}"
    if kind == "route":
        return f"[route] layers {', '.join(map(str, spec[1]))}"
    if kind == "upsample":
        return f"[upsample] stride={spec[1]}"
    if kind == "maxpool":
        return f"[maxpool] size={spec[1]} stride={spec[2]}"
    return "[yolo]"


def _anchors(yolos: list[Section], path: str) -> tuple[int, list[list[tuple[float, float]]]]:
    """(classes, per-output anchors) from the [yolo] sections, checked."""
    classes = {_int(s, path, "classes", 20) for s in yolos}
    if len(classes) != 1:
        raise CfgError(f"{path}: the [yolo] sections disagree on classes= ({sorted(classes)})")
    per_output = []
    for sec in yolos:
        try:
            flat = [float(v) for v in sec.options.get("anchors", "").replace(" ", "").split(",")
                    if v]
        except ValueError:
            raise CfgError(f"{sec.where(path, 'anchors')}: anchors= is not a list of numbers") \
                from None
        if not flat or len(flat) % 2:
            raise CfgError(f"{sec.where(path, 'anchors')}: anchors= needs w,h pairs")
        pairs = list(zip(flat[::2], flat[1::2]))
        num = _int(sec, path, "num", len(pairs))
        if num != len(pairs):
            raise CfgError(f"{sec.where(path, 'num')}: num={num} but anchors= holds "
                           f"{len(pairs)} pairs")
        mask = _ints(sec, path, "mask") if "mask" in sec.options else list(range(num))
        if any(m < 0 or m >= num for m in mask):
            raise CfgError(f"{sec.where(path, 'mask')}: mask {mask} indexes past the "
                           f"{num} anchors")
        chosen = [pairs[m] for m in mask]
        if any(w <= 0 or h <= 0 for w, h in chosen):
            raise CfgError(f"{sec.where(path, 'anchors')}: anchors must be positive")
        per_output.append(chosen)
    if len({len(a) for a in per_output}) != 1:
        raise CfgError(f"{yolos[1].where(path, 'mask')}: every [yolo] needs the same number of "
                       f"anchors (masks pick {[len(a) for a in per_output]})")
    return classes.pop(), per_output


def read_cfg(path: str | Path) -> CfgModel:
    """Parse ``path`` and match it against the yolov3 / yolov3-tiny layouts (CfgError if not)."""
    p = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CfgError(f"{p}: cannot read the cfg ({getattr(e, 'strerror', None) or e})") \
            from None
    sections = parse_cfg(text, p)
    net, layers = sections[0], sections[1:]
    if _int(net, p, "channels", 3) != 3:
        raise CfgError(f"{net.where(p, 'channels')}: channels={net.options['channels']}; only "
                       "RGB (channels=3) inputs are supported")
    width, height = _int(net, p, "width", 416), _int(net, p, "height", 416)
    if width % 32 or height % 32 or width <= 0 or height <= 0:
        raise CfgError(f"{net.where(p, 'width')}: width={width} height={height}: both must be "
                       "positive multiples of 32")
    yolos = [s for s in layers if s.kind == "yolo"]
    if not yolos:
        raise CfgError(f"{p}: no [yolo] section: not a YOLOv3 detector cfg")
    classes, anchors = _anchors(yolos, p)
    out_filters = len(anchors[0]) * (5 + classes)
    specs, k = [], 0
    for i, sec in enumerate(layers):
        specs.append(_layer_spec(sec, i, p, k))
        k += sec.kind == "yolo"
    best = None
    for name, fn in (("yolov3", _yolov3_specs), ("yolov3-tiny", _yolov3_tiny_specs)):
        want = _absolute(fn(out_filters))
        if want == specs:
            if len(yolos) != len(anchors):
                break
            return CfgModel(name, classes, anchors, width, height)
        at = next(i for i in range(max(len(want), len(specs)) + 1)
                  if i >= len(want) or i >= len(specs) or want[i] != specs[i])
        if best is None or at > best[0]:
            best = (at, name, want)
    at, name, want = best
    got = specs[at] if at < len(specs) else None
    where = layers[at].where(p) if at < len(layers) else f"{p}: line {layers[-1].line}+"
    raise CfgError(f"{where} (layer {at}) is {_describe(got)}, but {name} (the closest "
                   f"supported layout, for {classes} classes and {len(anchors[0])} anchors per "
                   f"[yolo]) has {_describe(want[at] if at < len(want) else None)} there; only "
                   "the yolov3 and yolov3-tiny layouts can be imported")


def cfg_text(model: YOLOv3, width: int = 416, height: int | None = None) -> str:
    """The Darknet cfg of ``model`` (Darknet's anchor convention: one sorted list, per-[yolo]
    masks; the largest-stride output holds the last indices)."""
    height = height or width
    n_out = len(model.anchors)
    flat = [(float(w), float(h)) for scale in reversed(model.anchors) for w, h in scale]
    a = model.num_anchors
    anchors = ",  ".join(f"{w:g},{h:g}" for w, h in flat)
    out = ["[net]", "batch=1", "subdivisions=1", f"width={width}", f"height={height}",
           "channels=3", "momentum=0.9", "decay=0.0005", "learning_rate=0.001", ""]
    for i, m in enumerate(model.layers):
        if isinstance(m, ConvLayer):
            bn = m.bn is not None
            out += ["[convolutional]"] + (["batch_normalize=1"] if bn else []) + [
                f"filters={m.conv.out_channels}", f"size={m.conv.kernel_size[0]}",
                f"stride={m.conv.stride[0]}", "pad=1", f"activation={'leaky' if bn else 'linear'}"]
        elif isinstance(m, Shortcut):
            out += ["[shortcut]", f"from={m.sources[0] - i}", "activation=linear"]
        elif isinstance(m, Route):
            out += ["[route]", "layers = " + ", ".join(
                str(s - i) if i - s <= 4 else str(s) for s in m.sources)]
        elif isinstance(m, Upsample):
            out += ["[upsample]", f"stride={m.factor}"]
        elif isinstance(m, MaxPool):
            out += ["[maxpool]", f"size={m.size}", f"stride={m.stride}"]
        elif isinstance(m, YoloLayer):
            first = (n_out - 1 - m.scale) * a
            out += ["[yolo]", "mask = " + ",".join(str(first + j) for j in range(a)),
                    f"anchors = {anchors}", f"classes={model.num_classes}", f"num={n_out * a}",
                    "jitter=.3", "ignore_thresh = .7", "truth_thresh = 1", "random=1"]
        else:  # pragma: no cover - every layer kind of yolov3.py is listed above
            raise TypeError(f"layer {i}: {type(m).__name__} has no Darknet section")
        out.append("")
    return "\n".join(out)

