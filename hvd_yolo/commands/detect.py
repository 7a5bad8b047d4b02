"""`hvd-yolo detect`: run a checkpoint on image files, folders of images or a shard directory.

Writes a COCO results json (``image_id, category_id, bbox [x, y, w, h], score`` in original
pixels, plus the image's ``file_name``) and, with ``--draw DIR``, one PNG per image with the
boxes drawn, at the image's path relative to its input folder (subfolders kept).

It never writes over what it did not write: ``--out`` must be new or an earlier detections
file, ``--draw`` must be a new or empty folder, or one it drew into before (it leaves a
``.hvd-yolo-detect`` marker there), outside every input folder. A file that does not decode is
skipped with its reason; the run fails only when no image could be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hvd_yolo import config
from hvd_yolo.cli import RunError, UsageError
from hvd_yolo.commands.model import add_pair_arguments, open_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DRAW_MARKER = ".hvd-yolo-detect"


class DetectError(UsageError):
    """A user mistake: reported as ``hvd-yolo detect: error: ...`` (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a checkpoint from hvd-yolo train or model import")
    add_pair_arguments(parser)  # --cfg/--weights/--names: a Darknet pair instead
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or a shard dir")
    parser.add_argument("--out", required=True,
                        help="COCO results json to write (new, or an earlier detections file)")
    parser.add_argument("--draw", metavar="DIR", help="write PNGs with boxes drawn into DIR "
                        "(new or empty, or an earlier --draw folder; subfolders kept)")
    parser.add_argument("--size", type=int, help="input size (default: the training size)")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=100)
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that has no hvd-yolo checksum record (still read "
                        "as tensors and plain values only, never code)")


# ----------------------------------------------------------------------------- inputs


def plan_inputs(inputs: list[str]) -> list[tuple[Path, Any]]:
    """``(input, what)`` per input: a shard dir -> "shards", a folder -> its image files, a file
    -> [file]. Raises DetectError naming an input that does not exist or holds no images."""
    plan: list[tuple[Path, Any]] = []
    for item in inputs:
        path = Path(item)
        if (path / "manifest.json").is_file():
            plan.append((path, "shards"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DetectError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {path}")
            plan.append((path, files))
        elif path.is_file():
            plan.append((path, [path]))
        else:
            raise DetectError(f"{path} does not exist")
    return plan


def relative_names(plan: list[tuple[Path, Any]]) -> dict[Path, str]:
    """Each input file's name in the outputs: relative to its folder (subfolders kept); with
    several inputs, under the input's own name. Raises DetectError when two would collide."""
    names: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for root, files in plan:
        if files == "shards":
            continue
        for f in files:
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            if len(plan) > 1 and root.is_dir():
                rel = f"{root.name}/{rel}"
            key = str(Path(rel).with_suffix(""))
            if key in seen:
                raise DetectError(f"{f} and {seen[key]} would both be drawn as {key}.png: give "
                                  "them different names or run detect on each separately")
            seen[key] = f
            names[f.resolve()] = rel
    return names


def decode_file(path: Path) -> torch.Tensor:
    """uint8 [3,H,W] RGB: the shard reader's decoder (:func:`hvd_yolo.shards.format.decode_rgb`:
    EXIF orientation applied, 16-bit images scaled to 8 bits), then PIL for what torchvision
    does not read (BMP, GIF...)."""
    from hvd_yolo.shards.format import decode_rgb

    data = path.read_bytes()
    try:
        return decode_rgb(data)
    except RuntimeError:
        import io

        import numpy as np
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def iter_images(plan: list[tuple[Path, Any]], names: dict[Path, str], skipped: list[str]
                ) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield ``(image_id, output name, uint8 image [3,H,W])``; unreadable files are appended to
    ``skipped`` (with the reason) and printed, not fatal."""
    from hvd_yolo.shards.format import ShardError, error_text

    next_id = 0
    for root, files in plan:
        if files == "shards":
            from hvd_yolo.data.dataset import ShardDataset

            try:
                ds = ShardDataset(root)
            except (ShardError, OSError) as e:  # a truncated or unreadable shard: one line
                raise RunError(f"{root}: {error_text(e)} (`hvd-yolo shards verify {root}` "
                               "lists the damage)") from None
            for i in range(len(ds)):
                try:
                    s = ds[i]
                except (ShardError, OSError) as e:
                    _skip(skipped, error_text(e))
                    continue
                yield s["image_id"], s["name"], s["image"]
            continue
        for f in files:
            try:
                image = decode_file(f)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, named
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                _skip(skipped, f"{f}: not a readable image ({why})")
                continue
            yield next_id, names[f.resolve()], image
            next_id += 1


def _skip(skipped: list[str], reason: str) -> None:
    skipped.append(reason)
    print(f"hvd-yolo detect: skipped {reason}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- outputs


def check_outputs(out: Path, draw: Path | None, plan: list[tuple[Path, Any]],
                  checkpoint: Path) -> None:
    """Refuse any output that would replace an input, the checkpoint or a file detect did not
    write (DetectError naming it)."""
    from hvd_yolo.outputs import OutputError, guard_output, is_detections

    inputs = [root.resolve() for root, _ in plan]
    files = [f for _, fs in plan if fs != "shards" for f in fs]
    try:
        guard_output(out, "--out", is_detections, [*inputs, *files, checkpoint],
                     "a detections file written by hvd-yolo detect")
    except OutputError as e:
        raise DetectError(str(e)) from None
    if draw is not None:
        d = draw.resolve()
        for root in inputs:
            if d == root or root in d.parents or (root.is_file() and d == root.parent):
                raise DetectError(f"--draw {draw} is inside the input {root}: drawings would mix "
                                  "with (or replace) the originals; choose another folder")
        if draw.exists() and (not draw.is_dir() or (
                any(draw.iterdir()) and not (draw / DRAW_MARKER).is_file())):
            raise DetectError(f"--draw {draw} exists and is not an empty folder or an earlier "
                              "--draw folder of hvd-yolo detect: choose a new folder")


# The largest --size and --max-det accepted: the training config's caps.
MAX_SIZE = config.MAX_INPUT_SIZE
MAX_DETECTIONS = int(config.CAPS["eval.max_det"])


def check_options(args: argparse.Namespace) -> None:
    """Refuse thresholds and sizes that cannot work, naming the option (DetectError)."""
    for option, value in (("--conf", args.conf), ("--iou", args.iou)):
        if not 0 <= value <= 1:
            raise DetectError(f"{option} {value:g}: must be in [0, 1]")
    if not 1 <= args.max_det <= MAX_DETECTIONS:
        raise DetectError(f"--max-det {args.max_det}: must be in [1, {MAX_DETECTIONS}]")
    if args.size is not None and (args.size <= 0 or args.size % 32 or args.size > MAX_SIZE):
        raise DetectError(f"--size {args.size}: must be a positive multiple of 32, at most "
                          f"{MAX_SIZE}")


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of ``--checkpoint`` or of ``--cfg``/``--weights`` and its state, or DetectError
    naming the file in one line (missing, a folder, truncated, not a checkpoint, unsealed without
    ``--trust-checkpoint``, weights that do not fit)."""
    from hvd_yolo.checkpoint import CheckpointError

    try:
        return open_model(args)
    except CheckpointError as e:
        raise DetectError(str(e)) from None
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DetectError(f"{args.checkpoint}: not a usable hvd-yolo checkpoint ({why})") from None


def run(args: argparse.Namespace) -> int:
    check_options(args)
    return detect(args)


def detect(args: argparse.Namespace) -> int:
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes

    from hvd_yolo.data.transforms import letterbox
    from hvd_yolo.evaluate import detect_batch

    out, draw_dir = Path(args.out), Path(args.draw) if args.draw else None
    plan = plan_inputs(args.inputs)
    names = relative_names(plan)
    check_outputs(out, draw_dir, plan, Path(args.checkpoint or args.weights or "-"))
    model, state = load_model(args)
    size = args.size or state["config"]["input"]["size"]
    labels, category_ids = state["class_names"], state.get("category_ids")
    to_cls = {cid: i for i, cid in enumerate(category_ids)} if category_ids else None
    if draw_dir:
        draw_dir.mkdir(parents=True, exist_ok=True)
        (draw_dir / DRAW_MARKER).write_text("drawings of hvd-yolo detect\n")
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    count = 0
    for image_id, name, image in iter_images(plan, names, skipped):
        lb, _, meta = letterbox(image, None, size)
        meta["image_id"] = image_id
        dets = detect_batch(model, lb[None].float() / 255, [meta], args.conf, args.iou,
                            args.max_det, category_ids)
        for d in dets:
            d["file_name"] = name
        results += dets
        count += 1
        if draw_dir:
            boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                   d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            text = [f"{labels[to_cls[d['category_id']] if to_cls else d['category_id']]} "
                    f"{d['score']:.2f}" for d in dets]
            target = draw_dir / Path(name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(draw_bounding_boxes(image, boxes, text, colors="yellow", width=2), str(target))
    if count == 0:
        raise RunError(f"none of the inputs could be read ({len(skipped)} skipped)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results))
    print(f"{count} images, {len(results)} detections -> {out}"
          + (f"; drawings in {draw_dir}" if draw_dir else "")
          + (f"; {len(skipped)} skipped (named above)" if skipped else ""))
    return 0
