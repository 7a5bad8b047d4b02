"""The built-in demo dataset: coloured shapes drawn on a textured background, with exact boxes.

Three classes (``circle``, ``square``, ``triangle``); each object's box is the exact pixel extent
of what was drawn, so a perfect detector reaches mAP 1.0. Used by the demo, the learning test and
the converter tests (``write_yolo_dataset`` writes the ``images/`` + ``labels/`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
# One base colour per class (RGB); each object jitters it a little.
_CLASS_COLOURS = np.array([[220, 60, 60], [60, 200, 80], [70, 90, 230]], dtype=np.int64)


@dataclass
class SyntheticSample:
    """One image (H, W, 3 uint8), its boxes (k, 4 float32 xyxy, absolute pixels) and classes."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in others)


def make_sample(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    max_objects: int = 4,
    min_frac: float = 0.12,
    max_frac: float = 0.4,
) -> SyntheticSample:
    """Draw 1..max_objects non-overlapping shapes on a noisy background."""
    base = rng.integers(90, 170, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    short = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            size = int(rng.integers(int(min_frac * short), int(max_frac * short) + 1))
            w = max(8, int(size * rng.uniform(0.8, 1.25)))
            h = max(8, size)
            if w >= width or h >= height:
                continue
            x0 = int(rng.integers(0, width - w))
            y0 = int(rng.integers(0, height - h))
            box = (x0, y0, x0 + w, y0 + h)  # exclusive right/bottom edges
            if not _overlaps(box, boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        colour = tuple(int(c) for c in np.clip(_CLASS_COLOURS[cls] + rng.integers(-25, 26, 3), 0, 255))
        x1, y1 = box[2] - 1, box[3] - 1  # PIL's shape coordinates are inclusive
        if cls == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif cls == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        boxes.append(box)
        classes.append(cls)
    return SyntheticSample(
        image=np.asarray(img, dtype=np.uint8),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        classes=np.asarray(classes, dtype=np.int64),
    )


def make_samples(
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] | None = 256,
    size_range: tuple[int, int] = (192, 320),
    **kwargs,
) -> list[SyntheticSample]:
    """``n`` samples; ``size`` fixes (H, W) (an int means square), ``None`` draws each in range."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if size is None:
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        elif isinstance(size, int):
            h = w = size
        else:
            h, w = size
        out.append(make_sample(rng, h, w, **kwargs))
    return out


def write_yolo_dataset(
    root: str | Path,
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    image_format: str = "jpg",
    **kwargs,
) -> Path:
    """Write ``n`` samples as a YOLO-txt dataset: ``images/``, ``labels/`` and ``data.yaml``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(make_samples(n, seed=seed, size=size, **kwargs)):
        stem = f"synth_{seed:04d}_{i:05d}"
        img = Image.fromarray(s.image)
        if image_format == "jpg":
            img.save(root / "images" / f"{stem}.jpg", quality=92)
        else:
            img.save(root / "images" / f"{stem}.{image_format}")
        h, w = s.image.shape[:2]
        lines = []
        for (x0, y0, x1, y1), c in zip(s.boxes.tolist(), s.classes.tolist()):
            cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
            lines.append(f"{c} {cx:.6f} {cy:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
        (root / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    (root / "data.yaml").write_text(f"nc: {len(CLASS_NAMES)}\nnames:\n{names}\n")
    return root
