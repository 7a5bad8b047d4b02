"""Run configuration: nested dataclasses, loaded from YAML, overridden with ``--set a.b=value``.

The resolved config is saved in every checkpoint and printed at start, so a run can always be
reproduced from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    train: str = ""  # shard directory (hvd-yolo convert output)
    val: str | None = None  # shard directory for periodic evaluation
    workers: int = 2  # DataLoader workers per rank
    tail: str = "pad"  # "pad" (repeat samples) or "drop": how ranks are made even


@dataclass
class ModelConfig:
    name: str = "yolov3-tiny"  # or "yolov3"
    weights: str | None = None  # Darknet .weights (full or backbone-only) to start from


@dataclass
class InputConfig:
    size: int = 416  # input size when multi-scale is off; must be a multiple of 32
    multiscale: bool = False
    min_size: int = 320
    max_size: int = 608
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
    momentum: float = 0.937
    weight_decay: float = 5e-4  # not applied to BatchNorm weights or biases
    batch_size: int = 8  # images per rank per backward pass
    accumulate: int = 1  # backward passes per allreduce / optimizer step
    epochs: int = 10
    warmup_steps: int = 100  # linear warm-up (optimizer steps), then cosine to final_lr_ratio
    final_lr_ratio: float = 0.05
    clip_grad: float = 10.0  # max gradient norm after synchronize (0: off)
    ema: bool = True
    ema_decay: float = 0.999


@dataclass
class DistConfig:
    compression: str = "fp16"  # none | fp16
    op: str = "average"  # average | adasum
    sync_bn: bool = False
    threads: int | None = None  # CPU threads per rank (default cores // local ranks)
    fusion_threshold_mb: float | None = None  # HOROVOD_FUSION_THRESHOLD
    cycle_time_ms: float | None = None  # HOROVOD_CYCLE_TIME (default: 10 on CPU, Horovod's on GPU)
    cuda: bool | None = None  # None: use CUDA when available


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (0: only at the end)
    batch_size: int = 8
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 100


@dataclass
class RunConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 1  # optimizer steps between averaged metric lines
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: end of each epoch only)
    keep_last: int = 3
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    tensorboard: bool = False
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
        """Raise ValueError naming the key and value that cannot work."""
        sizes = [("input.size", self.input.size)]
        if self.input.multiscale:
            sizes += [("input.min_size", self.input.min_size), ("input.max_size", self.input.max_size)]
        for key, value in sizes:
            if value <= 0 or value % 32:
                raise ValueError(f"{key}={value}: YOLOv3 input sizes must be positive multiples of 32")
        if self.input.multiscale and self.input.min_size > self.input.max_size:
            raise ValueError(f"input.min_size={self.input.min_size} > input.max_size={self.input.max_size}")
        checks = {
            "dist.compression": (self.dist.compression, {"none", "fp16"}),
            "dist.op": (self.dist.op, {"average", "adasum"}),
            "optim.name": (self.optim.name, {"sgd", "adamw"}),
            "data.tail": (self.data.tail, {"pad", "drop"}),
            "model.name": (self.model.name, {"yolov3", "yolov3-tiny"}),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key}={value!r}: must be one of {sorted(allowed)}")
        for key, value in (("optim.batch_size", self.optim.batch_size),
                           ("optim.accumulate", self.optim.accumulate),
                           ("optim.epochs", self.optim.epochs)):
            if value < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if not self.data.train:
            raise ValueError("data.train is not set: give the training shard directory "
                             "(--set data.train=DIR or in the YAML file)")
        return self


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, rejecting unknown sections and keys by name."""
    sections = {}
    types = _section_types()
    for name, values in (raw or {}).items():
        if name not in types:
            raise ValueError(f"unknown config section {name!r}; known: {sorted(types)}")
        known = {f.name for f in dataclasses.fields(types[name])}
        unknown = set(values or {}) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in section {name!r}; known: {sorted(known)}")
        sections[name] = types[name](**(values or {}))
    cfg = Config(**sections)
    if isinstance(cfg.augment.hsv, list):
        cfg.augment.hsv = tuple(cfg.augment.hsv)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict."""
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.01")
        section, name = key.split(".")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (optional), apply overrides and validate."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or [])).validate()
