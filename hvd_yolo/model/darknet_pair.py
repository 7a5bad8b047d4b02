"""A Darknet ``.cfg`` + ``.weights`` pair as a model and a checkpoint dict, with class names.

``detect`` and ``eval`` take the pair directly (``--cfg/--weights``); ``model import`` writes the
dict as a checkpoint. The dict holds what a training checkpoint holds (plain types and tensors).
"""

from __future__ import annotations

from pathlib import Path

from hvd_yolo.model.darknet_cfg import CfgError, read_cfg
from hvd_yolo.model.yolov3 import YOLOv3

# Darknet's data/coco.names: the class order of the published 80-class weights.
COCO_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def class_names(cfg_path: str | Path, classes: int, names: str | Path | None = None
                ) -> tuple[list[str], str]:
    """The class names and where they came from: ``names`` (a Darknet ``.names`` file, one per
    line), else ``<cfg stem>.names`` beside the cfg, else Darknet's COCO names for 80 classes,
    else ``class0 ..``. A names file with another count is a CfgError."""
    candidates = [Path(names)] if names else [Path(cfg_path).with_suffix(".names")]
    for path in candidates:
        if names is None and not path.is_file():
            continue
        try:
            listed = [n.strip() for n in path.read_text().splitlines() if n.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise CfgError(f"{path}: cannot read the class names "
                           f"({getattr(e, 'strerror', None) or e})") from None
        if len(listed) != classes:
            raise CfgError(f"{path}: {len(listed)} class names, but the cfg has classes={classes}")
        return listed, str(path)
    if classes == len(COCO_NAMES):
        return list(COCO_NAMES), "Darknet's coco.names (80 classes; --names FILE for others)"
    return [f"class{i}" for i in range(classes)], "class0.. (no --names FILE given)"


def load_darknet_model(cfg_path: str | Path, weights: str | Path, names: str | Path | None = None
                       ) -> tuple[YOLOv3, dict]:
    """A ``.cfg`` + ``.weights`` pair as ``(model in eval mode, checkpoint dict)``; the dict is
    what ``hvd-yolo train`` writes (plain types and tensors), so ``detect`` and ``eval`` use it
    as they use a trained checkpoint. Raises CfgError, or ValueError/OSError for the weights."""
    from hvd_yolo.config import Config
    from hvd_yolo.model.darknet_io import load_darknet_weights

    spec = read_cfg(cfg_path)
    model = spec.build()
    cfg = Config()
    if not hasattr(cfg.model, "anchors") and len(spec.anchors[0]) != 3:
        raise CfgError(f"{cfg_path}: {len(spec.anchors[0])} anchors per [yolo]; checkpoints of "
                       "this version hold 3 per output")
    header = load_darknet_weights(model, weights)
    labels, names_from = class_names(cfg_path, spec.num_classes, names)
    cfg.model.name = spec.name
    cfg.data.train = f"darknet:{weights}"  # where the weights came from (no shards trained here)
    cfg.input.size = max(spec.width, spec.height)
    if hasattr(cfg.model, "anchors"):
        cfg.model.anchors = [[list(a) for a in scale] for scale in spec.anchors]
    state = {
        "model": model.state_dict(), "ema": None, "class_names": labels, "category_ids": None,
        "model_name": spec.name, "config": cfg.to_dict(), "epoch": 0, "step": 0,
        "darknet": {"cfg": str(cfg_path), "weights": str(weights), "names": names_from,
                    "version": [header.major, header.minor, header.revision],
                    "seen": header.seen, "width": spec.width, "height": spec.height},
    }
    return model.eval(), state
