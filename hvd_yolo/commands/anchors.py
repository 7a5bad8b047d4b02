"""`hvd-yolo anchors SHARDS --model yolov3 --size 416 [--out anchors.yaml] [--json PATH]`.

Reads the boxes of a shard directory from its index tables (no image is decoded), scaled the
way training letterboxes to ``--size``; fits anchors with k-means on 1 - IoU and a short
genetic refinement (``hvd_yolo.model.anchors``; seeded: ``--seed``); prints best-possible
recall and anchors above threshold of the model's current anchors (the official ones, or
``--anchors``) and of the new ones. ``--out`` writes a YAML fragment (``model.name`` and
``model.anchors``) that ``hvd-yolo train --config`` reads; ``--json`` the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from hvd_yolo.cli import RunError, UsageError, write_json

MARKER = "# hvd-yolo anchors"  # first line of every --out file (an earlier one may be replaced)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hvd_yolo.model.anchors import GENERATIONS

    parser.add_argument("shards", help="a shard directory (hvd-yolo convert output)")
    parser.add_argument("--model", choices=("yolov3", "yolov3-tiny"), default="yolov3-tiny")
    parser.add_argument("--size", type=int, default=416,
                        help="training input size (input.size), a multiple of 32 (default 416)")
    parser.add_argument("--anchors", metavar="YAML",
                        help="the current anchors, as model.anchors takes them (default: the "
                             "model's official ones)")
    parser.add_argument("--per-scale", type=int, default=3,
                        help="anchors per output scale (default 3, as Darknet)")
    parser.add_argument("--seed", type=int, default=0, help="k-means and refinement seed")
    parser.add_argument("--generations", type=int, default=GENERATIONS,
                        help=f"genetic refinement generations (default {GENERATIONS}; 0: off)")
    parser.add_argument("--out", metavar="PATH",
                        help="write a YAML fragment for hvd-yolo train --config (new, or an "
                             "earlier --out file)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-': stdout only)")


def _pairs(anchors: Any) -> str:
    return " | ".join(" ".join(f"{w:g}x{h:g}" for w, h in scale) for scale in anchors)


def fragment(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    """The ``--out`` YAML: how it was made and what it scores, then ``model.name/anchors``."""
    cur, new = figures["current"], figures["new"]
    anchors = [[[_num(w), _num(h)] for w, h in scale] for scale in new["anchors"]]
    flow = yaml.safe_dump(anchors, default_flow_style=True, width=1000).strip()
    body = f"model:\n  name: {args.model}\n  anchors: {flow}\n"
    return (f"{MARKER} {args.shards} --model {args.model} --size {args.size} --seed {args.seed}\n"
            f"# best-possible recall {new['bpr']:.4f} (current anchors {cur['bpr']:.4f}), "
            f"anchors above threshold {new['aat']:.2f} ({cur['aat']:.2f}), on "
            f"{figures['boxes_used']} boxes\n"
            f"# use: hvd-yolo train --config THIS_FILE --set data.train={args.shards}, or copy "
            f"model.anchors into your config\n" + body)


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def check_out(path: Path) -> None:
    """``--out`` must be new or a file this command wrote (never another file overwritten)."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name such as anchors.yaml")
    if path.exists():
        try:
            first = path.read_text(errors="replace").split("\n", 1)[0]
        except OSError as e:
            raise UsageError(f"--out {path}: cannot read ({e.strerror or e})") from None
        if not first.startswith(MARKER):
            raise UsageError(f"--out {path} exists and was not written by hvd-yolo anchors: "
                             "give a new file name, or move it away")


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.config import resolve_anchors
    from hvd_yolo.model import anchors as A
    from hvd_yolo.shards.format import ShardError

    if args.size <= 0 or args.size % 32:
        raise UsageError(f"--size {args.size}: must be a positive multiple of 32 (input.size)")
    if args.per_scale < 1 or args.generations < 0:
        raise UsageError("--per-scale must be >= 1 and --generations >= 0")
    if not Path(args.shards).is_dir():
        raise UsageError(f"{args.shards}: no such directory")
    try:
        given = yaml.safe_load(args.anchors) if args.anchors else None
        current = resolve_anchors(args.model, given)
    except (yaml.YAMLError, ValueError) as e:
        raise UsageError(f"--anchors {args.anchors!r}: {getattr(e, 'problem', None) or e}") from None
    if args.out:
        check_out(Path(args.out))
    try:
        wh_all = A.box_sizes(args.shards, args.size)
    except ShardError as e:
        raise RunError(str(e)) from None
    try:
        new = A.compute_anchors(A.usable(wh_all), len(current), args.per_scale, args.seed,
                                args.generations)
    except ValueError as e:
        raise RunError(f"{args.shards}: {e} at input size {args.size}") from None
    figures = {"shards": str(args.shards), "model": args.model, "size": args.size,
               "seed": args.seed, "threshold": A.THRESHOLD, **A.report(wh_all, current, new)}
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(fragment(args, figures))
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
        figures["out"] = str(args.out)
    write_json(args.json, figures)
    if args.json == "-":
        return 0
    dropped = figures["boxes"] - figures["boxes_used"]
    print(f"{args.shards}: {figures['boxes']:,} boxes at {args.size}x{args.size} (letterboxed)"
          + (f", {dropped:,} under {A.MIN_BOX:g} px left out" if dropped else ""))
    print(f"{'':8}{'best-possible recall':>22}{'anchors above thr.':>20}{'mean best IoU':>15}"
          f"   anchors (per output, stride {'/'.join(map(str, _strides(args.model)))})")
    for name in ("current", "new"):
        f = figures[name]
        print(f"{name:8}{f['bpr']:>22.4f}{f['aat']:>20.2f}{f['mean_best_iou']:>15.3f}   "
              f"{_pairs(f['anchors'])}")
    print(f"(a box can be recalled when an anchor is within {A.THRESHOLD:g}x of it in width and "
          f"height)")
    cur, new_bpr = figures["current"]["bpr"], figures["new"]["bpr"]
    if cur >= A.MIN_RECALL:
        print(f"the current anchors fit this data (best-possible recall >= {A.MIN_RECALL}): "
              f"changing them is optional")
    else:
        print(f"the current anchors miss {1 - cur:.1%} of the boxes; the new ones miss "
              f"{1 - new_bpr:.1%}")
    if args.out:
        print(f"wrote {args.out}: hvd-yolo train --config {args.out} --set data.train="
              f"{args.shards}  (or copy its model.anchors into your config)")
    return 0


def _strides(model: str) -> tuple[int, ...]:
    return (32, 16, 8) if model == "yolov3" else (32, 16)
