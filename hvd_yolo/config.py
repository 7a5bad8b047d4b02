"""Run configuration: nested dataclasses, loaded from YAML, overridden with ``--set a.b=value``.

The resolved config is saved in every checkpoint and printed at start, so a run can always be
reproduced from its checkpoint alone. Over 350 lines on purpose: one job, nested dataclasses;
each key, its ``#`` comment, which ``--print-config`` prints as its documentation, and its
check live together, one place for each fact.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, value or type that cannot work; the message names the key and the value."""


# Gradient compression names (hvd_yolo.comm.horovod maps them to Horovod's compressors, powersgd
# to hvd_yolo.comm.powersgd; the DDP benchmark baseline to its comm hooks).
COMPRESSIONS = ("none", "fp16", "powersgd")
# How the ranks' models are kept together (hvd_yolo.comm.build builds the GradSync for each).
SYNCS = ("allreduce", "local")
# How the gradients are combined (hvd_yolo.comm.allreduce maps them to Horovod's ops).
OPS = ("average", "adasum")
# The rest of the choices a config key offers, listed here once; the modules that act on them
# import them from here (hvd_yolo.model.yolov3, hvd_yolo.data.sampler/dataset, hvd_yolo.optim).
MODEL_NAMES = ("yolov3", "yolov3-tiny")
# Activation checkpointing: none; the backbone's residual blocks (tiny: its conv+maxpool stages);
# all: those and the neck/heads too (segments ending at each 3x3 conv and at the last layer).
CHECKPOINT_MODES = ("none", "backbone", "all")
# The official Darknet cfgs' COCO anchors (pixels, at 416), per output scale, large stride first:
# the defaults of model.anchors (hvd_yolo.model.yolov3 builds with them).
# cfg/yolov3.cfg: anchors 10,13 16,30 33,23 30,61 62,45 59,119 116,90 156,198 373,326.
YOLOV3_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((116, 90), (156, 198), (373, 326)),  # stride 32, mask 6,7,8
    ((30, 61), (62, 45), (59, 119)),  # stride 16, mask 3,4,5
    ((10, 13), (16, 30), (33, 23)),  # stride 8, mask 0,1,2
)
# cfg/yolov3-tiny.cfg: anchors 10,14 23,27 37,58 81,82 135,169 344,319 with masks 3,4,5 and
# 0,1,2, which the published yolov3-tiny.weights were trained with. (Forks differ: the cfg of
# ultralytics' Darknet-format yolov3 repository, and AlexeyAB's yolov4-tiny.cfg, use mask 1,2,3
# for the stride-16 head, (23,27) (37,58) (81,82): set model.anchors for weights trained so.)
YOLOV3_TINY_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((81, 82), (135, 169), (344, 319)),  # stride 32, mask 3,4,5
    ((10, 14), (23, 27), (37, 58)),  # stride 16, mask 0,1,2
)
DEFAULT_ANCHORS = {"yolov3": YOLOV3_ANCHORS, "yolov3-tiny": YOLOV3_TINY_ANCHORS}
TAILS = ("pad", "drop")  # the sampler's uneven end: pad to equal shares, or drop the rest
ON_CORRUPT = ("skip", "error")  # a sample failing its CRC32/decode
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class DataConfig:
    train: str = ""  # shard directory (hvd-yolo convert output)
    val: str | None = None  # shard directory for periodic evaluation
    workers: int = 2  # DataLoader workers per rank and loader (training, evaluation): forked once
    tail: str = "pad"  # "pad" (repeat samples) or "drop": how ranks are made even
    on_corrupt: str = "skip"  # sample failing its CRC32/decode: "skip" (named, replaced, counted) or "error"


@dataclass
class ModelConfig:
    name: str = "yolov3-tiny"  # or "yolov3"
    weights: str | None = None  # Darknet .weights (full or backbone-only) to start from
    # BatchNorm normalises with its running statistics (e.g. from weights) and keeps them; its
    # scale and shift still train. For fine-tuning with small per-rank batches or accumulation.
    freeze_bn: bool = False
    # Activation checkpointing: "none", "backbone" (Darknet-53's residual blocks; tiny: its
    # conv+maxpool stages) or "all" (also the neck and heads): less activation memory per rank
    # for a recomputed forward (hvd-yolo bench memory measures both). Same gradients.
    checkpoint: str = "none"
    # Per output (large stride first), [w, h] anchor pairs in input pixels; empty: the official
    # cfg's. `hvd-yolo anchors SHARDS` fits them to a dataset.
    anchors: list[list[list[float]]] = field(default_factory=list)


@dataclass
class InputConfig:
    size: int = 416  # input size when multi-scale is off; must be a multiple of 32
    multiscale: bool = False  # train at a random size in min_size..max_size (multiples of 32)
    min_size: int = 320  # smallest multi-scale size
    max_size: int = 608  # largest multi-scale size
    every: int = 10  # change the size every N optimizer steps


@dataclass
class AugmentConfig:
    flip: float = 0.5  # probability of a horizontal flip
    hsv: tuple[float, float, float] = (0.015, 0.7, 0.4)  # hue, saturation, value gains
    mosaic: float = 0.0  # probability of a 4-image mosaic


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (momentum, nesterov) or adamw
    lr: float = 0.01  # per-rank learning rate; scaled by world_size x accumulate
    momentum: float = 0.937  # SGD momentum / AdamW beta1
    weight_decay: float = 5e-4  # not applied to BatchNorm weights or biases
    batch_size: int = 8  # images per rank per backward pass
    accumulate: int = 1  # backward passes per allreduce / optimizer step
    epochs: int = 10  # passes over the training shards
    warmup_steps: int = 100  # linear warm-up (optimizer steps), then cosine to final_lr_ratio
    final_lr_ratio: float = 0.05  # the last step's learning rate / the peak
    clip_grad: float = 10.0  # max gradient norm after synchronize (0: off)
    ema: bool = True  # keep an exponential moving average of the weights (evaluated, saved)
    ema_decay: float = 0.999  # its decay per optimizer step


@dataclass
class DistConfig:
    # none | fp16 | powersgd (low-rank gradients with error feedback, dist.powersgd_rank)
    compression: str = "fp16"
    # allreduce: gradients averaged every step | local: each rank steps on its own gradients and
    # the weights are averaged every dist.local_steps steps (local SGD)
    sync: str = "allreduce"
    local_steps: int = 4  # dist.sync=local: optimizer steps between weight averages
    # dist.sync=local: plain gradient allreduce for the first N optimizer steps (post-local SGD)
    sync_warmup_steps: int = 0
    # dist.sync=local: average the optimizer state (momentum) with the weights too (doubles the
    # bytes of each average; always done before a checkpoint)
    local_sync_momentum: bool = False
    # dist.sync=local: each average travels while the next period trains and lands at its end
    # (one period late; hides the average where a period's compute outlasts it)
    local_overlap: bool = False
    powersgd_rank: int = 4  # dist.compression=powersgd: rank r of each compressed gradient matrix
    # dist.compression=powersgd: whole-gradient allreduce before this optimizer step (the LR
    # warm-up's, by default), in dist.powersgd_warmup_compression (none: fp32 | fp16)
    powersgd_start_step: int = 100
    powersgd_warmup_compression: str = "fp16"
    op: str = "average"  # average | adasum (LR not scaled by world size; needs optim.clip_grad=0)
    sync_bn: bool = False  # BatchNorm statistics over all ranks (Horovod SyncBatchNorm)
    threads: int | None = None  # CPU threads per rank (default cores // local ranks)
    fusion_threshold_mb: float | None = None  # HOROVOD_FUSION_THRESHOLD
    cycle_time_ms: float | None = None  # HOROVOD_CYCLE_TIME (default: 10 on CPU, Horovod's on GPU)
    cuda: bool | None = None  # None: use CUDA when available
    stall_warning_s: float = 60.0  # a rank without progress this long warns (Horovod's too)
    stall_shutdown_s: float = 600.0  # ... and this long ends the job, naming frozen ranks (0: never)


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (0: only at the end)
    batch_size: int = 8  # images per rank per evaluation step
    conf_thres: float = 0.001  # detections below this score are dropped
    iou_thres: float = 0.6  # NMS IoU threshold
    max_det: int = 100  # detections kept per image


@dataclass
class RunConfig:
    out_dir: str = "runs/train"  # checkpoints/, metrics.jsonl, config.json
    seed: int = 0  # weights, data order and augmentation
    log_every: int = 1  # optimizer steps between averaged metric lines (0: the last step only)
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: end of each epoch only)
    commit_every: int = 1  # elastic runs: steps between in-memory commits (a lost rank rolls back to one)
    keep_last: int = 3  # step-N.pt checkpoints kept (the most recently written)
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    tensorboard: bool = False  # also write TensorBoard event files on rank 0
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Raise ConfigError naming the key and value that cannot work; an empty
        ``model.anchors`` becomes the model's default (so checkpoints record the anchors)."""
        sizes = [("input.size", self.input.size)]
        if self.input.multiscale:
            sizes += [("input.min_size", self.input.min_size), ("input.max_size", self.input.max_size)]
        for key, value in sizes:
            if value <= 0 or value % 32:
                raise ConfigError(f"{key}={value}: YOLOv3 input sizes must be positive multiples of 32")
        if self.input.multiscale and self.input.min_size > self.input.max_size:
            raise ConfigError(f"input.min_size={self.input.min_size} > input.max_size={self.input.max_size}")
        checks = {
            "dist.compression": (self.dist.compression, set(COMPRESSIONS)),
            "dist.powersgd_warmup_compression": (self.dist.powersgd_warmup_compression,
                                                 set(COMPRESSIONS) - {"powersgd"}),
            "dist.op": (self.dist.op, set(OPS)),
            "dist.sync": (self.dist.sync, set(SYNCS)),
            "optim.name": (self.optim.name, set(OPTIMIZERS)),
            "data.tail": (self.data.tail, set(TAILS)),
            "data.on_corrupt": (self.data.on_corrupt, set(ON_CORRUPT)),
            "model.name": (self.model.name, set(MODEL_NAMES)),
            "model.checkpoint": (self.model.checkpoint, set(CHECKPOINT_MODES)),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: must be one of {sorted(allowed)}")
        check_ranges(self)
        check_caps(self)
        self.model.anchors = checked_anchors(self.model)
        if self.dist.op == "adasum" and self.optim.clip_grad > 0:
            raise ConfigError(
                f"dist.op=adasum with optim.clip_grad={self.optim.clip_grad}: Adasum updates each "
                f"parameter inside its backward hook, before the whole gradient (and its norm) "
                f"exists, so it cannot clip: set optim.clip_grad=0")
        check_sync(self.dist)
        if self.model.checkpoint != "none" and self.dist.sync_bn:
            raise ConfigError(
                f"model.checkpoint={self.model.checkpoint} with dist.sync_bn=true: a checkpointed "
                f"segment recomputes its forward during backward, which would repeat SyncBN's "
                f"allreduces there; set model.checkpoint=none or dist.sync_bn=false")
        if self.dist.stall_shutdown_s and self.dist.stall_shutdown_s <= self.dist.stall_warning_s:
            raise ConfigError(f"dist.stall_shutdown_s={self.dist.stall_shutdown_s} must exceed "
                              f"dist.stall_warning_s={self.dist.stall_warning_s} (or be 0: never)")
        if not self.run.out_dir.strip():
            raise ConfigError("run.out_dir is empty: give the run's folder (checkpoints, logs), "
                              "e.g. --set run.out_dir=runs/mine")
        if not self.data.train:
            raise ConfigError("data.train is not set: give the training shard directory "
                              "(--set data.train=DIR or in the YAML file)")
        return self


# key -> (lowest, highest or None, lowest allowed?, highest allowed?)
RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "data.workers": (0, None, True, True),
    "input.every": (1, None, True, True),
    "augment.flip": (0, 1, True, True),
    "augment.mosaic": (0, 1, True, True),
    "augment.hsv": (0, None, True, True),
    "optim.lr": (0, None, False, True),
    "optim.momentum": (0, 1, True, False),
    "optim.weight_decay": (0, None, True, True),
    "optim.batch_size": (1, None, True, True),
    "optim.accumulate": (1, None, True, True),
    "optim.epochs": (1, None, True, True),
    "optim.warmup_steps": (0, None, True, True),
    "optim.final_lr_ratio": (0, 1, True, True),
    "optim.clip_grad": (0, None, True, True),
    "optim.ema_decay": (0, 1, True, False),
    "dist.threads": (1, None, True, True),
    "dist.fusion_threshold_mb": (0, None, True, True),
    "dist.cycle_time_ms": (0, None, False, True),
    "dist.local_steps": (1, None, True, True),
    "dist.sync_warmup_steps": (0, None, True, True),
    "dist.powersgd_rank": (1, None, True, True),
    "dist.powersgd_start_step": (0, None, True, True),
    "dist.stall_warning_s": (0, None, False, True),
    "dist.stall_shutdown_s": (0, None, True, True),
    "eval.every": (0, None, True, True),
    "eval.batch_size": (1, None, True, True),
    "eval.conf_thres": (0, 1, True, False),
    "eval.iou_thres": (0, 1, False, True),
    "eval.max_det": (1, None, True, True),
    "run.log_every": (0, None, True, True),
    "run.checkpoint_every": (0, None, True, True),
    "run.commit_every": (1, None, True, True),
    "run.keep_last": (1, None, True, True),
    "run.max_steps": (0, None, True, True),
}


# Caps on counts and sizes: far above any real run, low enough that a typo (1e30, an extra run
# of zeros) is named here instead of forking workers until the OOM killer comes or allocating
# an image that crashes the interpolation. Checked after RANGES.
MAX_INPUT_SIZE = 4096  # pixels per side
MAX_STEPS = 10**9  # any count of steps or epochs
MAX_SECONDS = 10**7  # any duration (~4 months)
CAPS: dict[str, float] = {
    "input.size": MAX_INPUT_SIZE, "input.min_size": MAX_INPUT_SIZE,
    "input.max_size": MAX_INPUT_SIZE, "input.every": MAX_STEPS,
    "data.workers": 256, "augment.hsv": 10,
    "optim.batch_size": 4096, "optim.accumulate": 4096, "optim.epochs": MAX_STEPS,
    "optim.warmup_steps": MAX_STEPS,
    "dist.threads": 4096, "dist.fusion_threshold_mb": 65536, "dist.cycle_time_ms": 60000,
    "dist.local_steps": MAX_STEPS, "dist.sync_warmup_steps": MAX_STEPS,
    "dist.powersgd_rank": 4096, "dist.powersgd_start_step": MAX_STEPS,
    "dist.stall_warning_s": MAX_SECONDS, "dist.stall_shutdown_s": MAX_SECONDS,
    "eval.every": MAX_STEPS, "eval.batch_size": 4096, "eval.max_det": 100000,
    "run.seed": 2**63 - 1, "run.log_every": MAX_STEPS, "run.checkpoint_every": MAX_STEPS,
    "run.commit_every": MAX_STEPS, "run.keep_last": 100000, "run.max_steps": MAX_STEPS,
}


def check_caps(cfg: Config) -> None:
    """Raise ConfigError for a count or size above its cap in ``CAPS`` (None is allowed), or a
    negative seed."""
    if cfg.run.seed < 0:
        raise ConfigError(f"run.seed={cfg.run.seed}: must be >= 0")
    for key, cap in CAPS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and v > cap:
                raise ConfigError(f"{key}={value!r}: at most {int(cap)} (a cap on this key: a "
                                  "larger value is taken for a typo)")


def checked_anchors(m: ModelConfig) -> list[list[list[float]]]:
    """``model.anchors`` checked against ``model.name``, the official default when empty."""
    try:
        anchors = resolve_anchors(m.name, m.anchors)
    except ValueError as e:
        raise ConfigError(f"model.anchors={m.anchors!r}: {str(e).removeprefix('anchors: ')}") from None
    return [[list(pair) for pair in scale] for scale in anchors]


def check_sync(d: DistConfig) -> None:
    """Refuse the combinations of sync, compression and op that have no meaning together."""
    if d.sync == "local" and d.compression == "powersgd":
        raise ConfigError("dist.sync=local with dist.compression=powersgd: local SGD averages "
                          "weights, not gradients; use dist.compression=none or fp16 (its "
                          "warm-up gradient allreduce)")
    if d.local_overlap and d.sync != "local":
        raise ConfigError(f"dist.local_overlap=true with dist.sync={d.sync}: it overlaps local "
                          f"SGD's weight averages; set dist.sync=local or drop it")
    if d.op == "adasum" and (d.sync == "local" or d.compression == "powersgd"):
        what = "dist.sync=local" if d.sync == "local" else "dist.compression=powersgd"
        raise ConfigError(f"dist.op=adasum with {what}: Adasum is Horovod's own optimizer; use "
                          f"dist.op=average")


def check_ranges(cfg: Config) -> None:
    """Raise ConfigError for a number outside its key's range in ``RANGES`` (None is allowed)."""
    for key, (lo, hi, lo_ok, hi_ok) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        for v in value if isinstance(value, tuple) else (value,):
            if v is None:
                continue
            if v < lo or (v == lo and not lo_ok) or (
                    hi is not None and (v > hi or (v == hi and not hi_ok))):
                wanted = (f"{'>=' if lo_ok else '>'} {lo}" if hi is None else
                          f"in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}")
                raise ConfigError(f"{key}={value!r}: must be {wanted}")


# ----------------------------------------------------------------------------- types


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def field_types(section: type) -> dict[str, Any]:
    """Field name -> resolved type of a config section dataclass."""
    return typing.get_type_hints(section)


def describe_type(tp: Any) -> str:
    """``float | None`` -> 'a number or null' (for error messages)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe_type(args[0])} values"
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as the field type ``tp`` (bool, int, float, str, X | None, tuple[...]): '1e-3'
    becomes 0.001 for a float, 8.0 becomes 8 for an int; anything else raises ConfigError
    naming the key, the value and the type wanted."""
    try:
        return _coerce(value, tp)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r}: expected {describe_type(tp)}, got "
                          f"{type(value).__name__} {value!r}") from None


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a)
                except (TypeError, ValueError, OverflowError):
                    pass
        raise ValueError(value)
    if origin is tuple:
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in items)
        if len(items) != len(args):
            raise ValueError(value)
        return tuple(_coerce(v, a) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if isinstance(value, bool) and tp in (int, float):
        raise ValueError(value)  # true is not a number here
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise ValueError(value)
    if tp is float:
        if not isinstance(value, (int, float, str)):
            raise TypeError(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(value)
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, rejecting unknown sections and keys by name and
    coercing every value to its field's type (``coerce``)."""
    sections = {}
    kinds = _section_types()
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {raw!r}")
    for name, values in (raw or {}).items():
        if name not in kinds:
            raise ConfigError(f"unknown config section {name!r}; known: {sorted(kinds)}")
        if not isinstance(values or {}, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {values!r}")
        hints = field_types(kinds[name])
        unknown = set(values or {}) - set(hints)
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in section {name!r}; "
                              f"known: {sorted(hints)}")
        sections[name] = kinds[name](**{k: coerce(f"{name}.{k}", v, hints[k])
                                        for k, v in (values or {}).items()})
    return Config(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict. Values are parsed as YAML, except
    for string keys, which take the text as given (``data.train=2024`` is the folder '2024')."""
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {raw!r}")
    out = {}
    for k, v in (raw or {}).items():
        if not isinstance(v or {}, dict):
            raise ConfigError(f"config section {k!r} must be a mapping of keys, got {v!r}")
        out[k] = dict(v or {})
    kinds = _section_types()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.01")
        section, name = key.split(".")
        tp = field_types(kinds[section]).get(name) if section in kinds else None
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            if tp not in (str, str | None):
                raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                                  f"({getattr(e, 'problem', None) or e})") from None
            value = text
        if tp is str or (tp == str | None and value is not None):
            value = text
        out.setdefault(section, {})[name] = value
    return out


class DuplicateKey(yaml.YAMLError):
    """A mapping of the YAML file gives the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (the last one would
    win silently); keys brought in by a ``<<`` merge may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader names it
                break
            if first is not None:
                raise DuplicateKey(f"key {key!r} is given twice, at line {first} and line "
                                   f"{line}: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         check: bool = True) -> Config:
    """Load a YAML file (optional), apply overrides and validate (unless ``check`` is False)."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - safe
        except DuplicateKey as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:  # one line: what the parser expected and where
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{p}: not valid YAML ({what}{where})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    cfg = from_dict(apply_overrides(raw, overrides or []))
    return cfg.validate() if check else cfg


def field_comments(section: type) -> dict[str, str]:
    """Each field's comment in this file's source: the ``# ...`` after it, or the lines above it."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(section).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
        elif m := re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", text):
            comments[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
            above = []
    return comments


def to_commented_yaml(cfg: Config) -> str:
    """``cfg`` as YAML that :func:`load` reads back, each field with its comment."""
    lines = ["# hvd-yolo train configuration (hvd-yolo train --config FILE; --set SECTION.KEY=VALUE)"]
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        comments = field_comments(type(value))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            item = list(item) if isinstance(item, tuple) else item
            text = yaml.safe_dump({f.name: item}, default_flow_style=True, sort_keys=False)
            text = "  " + text.strip()[1:-1]  # "{key: value}" -> "key: value"
            note = comments.get(f.name)
            if note and len(text) + len(note) > 96:  # a long comment goes above its key
                lines += ["  # " + part for part in textwrap.wrap(note, 92)] + [text]
            else:
                lines.append(f"{text}  # {note}" if note else text)
    return "\n".join(lines) + "\n"


def check_anchors(anchors: Sequence[Sequence[Sequence[float]]], num_scales: int | None = None
                  ) -> list[list[tuple[float, float]]]:
    """``anchors`` as a list (one entry per output) of lists of ``(w, h)`` floats; ValueError
    unless every scale has the same number of pairs, every value is a positive finite number
    and (when given) there are ``num_scales`` scales."""
    shape_error = ValueError(
        f"anchors must be, per output scale, a list of [w, h] pairs in input pixels, e.g. "
        f"[[[81, 82], [135, 169]], [[10, 14], [23, 27]]]; got {anchors!r}")
    out: list[list[tuple[float, float]]] = []
    try:
        for scale in anchors:
            pairs = [tuple(float(v) for v in pair) for pair in scale]
            if any(len(pair) != 2 for pair in pairs):
                raise shape_error
            out.append(pairs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise shape_error from None
    if not out or not all(out):
        raise ValueError(f"anchors: every scale needs at least one [w, h] pair; got {anchors!r}")
    if num_scales is not None and len(out) != num_scales:
        raise ValueError(f"anchors: {len(out)} scales given, the model has {num_scales} outputs")
    counts = [len(s) for s in out]
    if len(set(counts)) != 1:
        raise ValueError(f"anchors: every scale needs the same number of anchors, got {counts}")
    bad = [p for s in out for p in s if not all(math.isfinite(v) and v > 0 for v in p)]
    if bad:
        raise ValueError(f"anchors: widths and heights must be positive pixels, got {bad[0]}")
    return out


def resolve_anchors(name: str, anchors: Sequence[Sequence[Sequence[float]]] | None
                    ) -> list[list[tuple[float, float]]]:
    """The anchors ``name`` is built with: ``anchors`` checked (``check_anchors``), or the
    official default when it is None or empty."""
    if name not in DEFAULT_ANCHORS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    default = DEFAULT_ANCHORS[name]
    return check_anchors(anchors if anchors else default, len(default))
