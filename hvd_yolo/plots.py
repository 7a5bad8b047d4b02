"""Figures of a run, drawn with matplotlib's Agg backend (no display needed).

``results_png``: training curves from ``metrics.jsonl`` (loss parts and LR against the step,
mAP against the epoch). ``write_eval_plots``: from an evaluation's merged matched pairs
(``matches.match_images``), the precision-recall curves (PNG + CSV), the F1-confidence curve,
the confusion matrix (PNG + CSV) and a grid of validation images with predictions and ground
truth. Rank 0 alone calls these.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvd_yolo import matches

GT_COLOR = "#00c000"
# class colors of the prediction grid: matplotlib's tab10 without its green (ground truth's)
CLASS_COLORS = ("C0", "C1", "C3", "C4", "C5", "C6", "C7", "C8", "C9")


@dataclass
class PlotRequest:
    """Evaluation plots into ``out_dir``: the confusion matrix at ``iou`` and ``conf``, the
    image grid of ``images`` validation images with the detections scoring >= ``conf``."""

    out_dir: Path
    conf: float = 0.25
    iou: float = 0.45
    images: int = 16
    # filled on rank 0 during the evaluation: (image id, uint8 HWC image at input scale, scale)
    samples: list[tuple[int, np.ndarray, float]] = field(default_factory=list)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    tmp.replace(path)  # a reader never sees half a PNG
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------ training curves
def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step records, eval records)`` of a ``metrics.jsonl``; a step or epoch logged twice
    (before a kill and after the resume) keeps its later record."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if r.get("type") == "step":
            steps[int(r["step"])] = r
        elif r.get("type") == "eval":
            evals[int(r["epoch"])] = r
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def results_png(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Draw ``metrics.jsonl``'s curves into ``out_path``: total, box, objectness and class loss
    and the learning rate against the optimizer step; mAP@0.5 and mAP@0.5:0.95 against the
    epoch."""
    steps, evals = read_metrics(Path(metrics_path))
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=100)
    x = [r["step"] for r in steps]
    panels = [("loss", "total loss"), ("box", "box loss"), ("obj", "objectness loss"),
              ("cls", "class loss"), ("lr", "learning rate")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(x, [r.get(key, math.nan) for r in steps], ".-", ms=3, lw=1.2, color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[4].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes.flat[5]
    ep = [r["epoch"] + 1 for r in evals]
    ax.plot(ep, [_num(r.get("mAP50")) for r in evals], "o-", label="mAP@0.5", color="C1")
    ax.plot(ep, [_num(r.get("mAP")) for r in evals], "s-", label="mAP@0.5:0.95", color="C2")
    ax.set_title("validation mAP")
    ax.set_xlabel("epochs trained")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(loc="best")
    if not evals:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{Path(metrics_path).parent.name}: {len(steps)} logged steps, "
                 f"{len(evals)} evaluations")
    fig.tight_layout()
    return _save(fig, Path(out_path))


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


# ------------------------------------------------------------------ evaluation figures
def write_eval_plots(
    request: PlotRequest,
    tables: dict[str, np.ndarray],
    category_ids: Sequence[int],
    class_names: Sequence[str],
    results: Sequence[dict[str, Any]],
    gt: dict[str, Any],
) -> list[Path]:
    """All evaluation figures from merged matched pairs; returns the files written."""
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in class_names]
    pr = matches.precision_recall(tables, category_ids)
    written = [*pr_curve(out, pr, names), f1_curve(out / "f1_curve.png",
                                                   matches.f1_confidence(tables, category_ids),
                                                   names)]
    matrix = matches.confusion_matrix(tables, category_ids)
    written += confusion(out, matrix, names, request.iou, request.conf)
    if request.samples:
        written.append(prediction_grid(out / "predictions.png", request.samples, results, gt,
                                       category_ids, names, request.conf))
    return written


def _legend_cols(n: int) -> int:
    return 1 if n <= 12 else 2


def _class_curves(path: Path, x: np.ndarray, lines: list[tuple[np.ndarray, str]],
                  mean: tuple[np.ndarray, str] | None, labels: tuple[str, str, str],
                  legend_loc: str) -> Path:
    """One curve per class (thin) and their mean (thick) against ``x`` on a unit square;
    ``labels``: x label, y label, title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    for y, label in lines:
        ax.plot(x, y, lw=1, label=label)
    if mean is not None:
        ax.plot(x, mean[0], lw=3, color="#1f3b70", label=mean[1])
    ax.set(xlabel=labels[0], ylabel=labels[1], xlim=(0, 1), ylim=(0, 1.02), title=labels[2])
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8, ncol=_legend_cols(len(lines) + 1))
    fig.tight_layout()
    return _save(fig, path)


def pr_curve(out: Path, pr: dict[str, np.ndarray], names: Sequence[str]) -> list[Path]:
    """``pr_curve.png`` and ``pr_curve.csv``: COCO's interpolated precision at IoU 0.5 against
    recall, per class and the mean over classes with ground truth."""
    p = pr["precision"][0]  # [R, K] at IoU 0.5
    valid = (p > -1).all(0)
    mean = p[:, valid].mean(1) if valid.any() else np.full(len(matches.RECALL_POINTS), np.nan)
    png = _class_curves(
        out / "pr_curve.png", matches.RECALL_POINTS,
        [(p[:, k], f"{name} {p[:, k].mean():.3f}") for k, name in enumerate(names) if valid[k]],
        (mean, f"all classes {np.mean(mean):.3f} mAP@0.5"),
        ("recall", "precision", "precision-recall curve (IoU 0.5, COCO interpolation)"),
        "lower left")
    csv_path = out / "pr_curve.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["recall", "all classes", *names])
        for r, rec in enumerate(matches.RECALL_POINTS):
            w.writerow([f"{rec:.2f}", f"{mean[r]:.6f}",
                        *(f"{p[r, k]:.6f}" if valid[k] else "" for k in range(len(names)))])
    return [png, csv_path]


def f1_curve(path: Path, f1: dict[str, np.ndarray], names: Sequence[str]) -> Path:
    """F1 against the confidence threshold, per class and the mean over classes."""
    conf, curves = f1["confidence"], f1["f1"]
    valid = ~np.isnan(curves).all(1)
    mean = None
    if valid.any():
        m = curves[valid].mean(0)
        best = int(np.argmax(m))
        mean = (m, f"all classes: F1 {m[best]:.2f} at confidence {conf[best]:.3f}")
    return _class_curves(path, conf, [(curves[k], name) for k, name in enumerate(names)
                                      if valid[k]],
                         mean, ("confidence threshold", "F1", "F1 against confidence (IoU 0.5)"),
                         "best")


def confusion(out: Path, matrix: np.ndarray, names: Sequence[str], iou: float,
              conf: float) -> list[Path]:
    """``confusion_matrix.png`` and ``.csv``: rows the true class, columns the predicted one,
    with a background row (false detections) and column (missed boxes)."""
    labels = [*names, "background"]
    csv_path = out / "confusion_matrix.csv"
    with csv_path.open("w", newline="") as f:
        f.write(f"# IoU >= {iou:g}; confidence >= {conf:g}; rows: true class; columns: "
                "predicted class\n")
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *labels])
        for name, row in zip(labels, matrix):
            w.writerow([name, *(int(v) for v in row)])
    plt = _pyplot()
    n = len(labels)
    side = min(14.0, 3.0 + 0.55 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    totals = matrix.sum(1, keepdims=True)
    frac = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix (IoU >= {iou:g}, confidence >= {conf:g})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class's row")
    fig.tight_layout()
    return [_save(fig, out / "confusion_matrix.png"), csv_path]


def prediction_grid(path: Path, samples: Sequence[tuple[int, np.ndarray, float]],
                    results: Sequence[dict[str, Any]], gt: dict[str, Any],
                    category_ids: Sequence[int], names: Sequence[str], conf: float) -> Path:
    """Validation images with their ground truth (green, dashed) and the detections scoring
    >= ``conf`` (solid, one color per class, with the score)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    name_of = {int(c): n for c, n in zip(category_ids, names)}
    color_of = {int(c): CLASS_COLORS[k % len(CLASS_COLORS)] for k, c in enumerate(category_ids)}
    plt = _pyplot()
    n = len(samples)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.6), dpi=100,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img_id, image, scale) in zip(axes.flat, samples):
        ax.imshow(image)
        for a in gt["annotations"]:
            if int(a["image_id"]) == img_id:
                x, y, w, h = (v * scale for v in a["bbox"])
                ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=GT_COLOR, lw=1.5, ls="--"))
        shown = 0
        for r in results:
            if int(r["image_id"]) == img_id and float(r["score"]) >= conf:
                x, y, w, h = (v * scale for v in r["bbox"])
                c = color_of.get(int(r["category_id"]), "red")
                ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=c, lw=1.5))
                ax.text(x, y, f"{name_of.get(int(r['category_id']), r['category_id'])} "
                        f"{float(r['score']):.2f}", color="white", fontsize=6, va="bottom",
                        bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "lw": 0})
                shown += 1
        ax.set_title(f"image {img_id}: {shown} detected", fontsize=8)
    handles = [Line2D([], [], color=GT_COLOR, ls="--", label="ground truth")]
    handles += [Line2D([], [], color=color_of[int(c)], label=f"predicted {name_of[int(c)]}")
                for c in category_ids][:10]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"validation images: ground truth and detections with confidence >= {conf:g}")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, path)


def training_figures(out_dir: str | Path, figures: dict[str, Any]) -> None:
    """After an evaluation in training (rank 0): ``results.png`` redrawn from
    ``metrics.jsonl``, and what the evaluation's figures hold; a figure that cannot be drawn
    is a warning, never the end of the run."""
    import warnings

    out_dir = Path(out_dir)
    try:
        path = results_png(out_dir / "metrics.jsonl", out_dir / "results.png")
        print(f"training curves: {path}", flush=True)
    except Exception as exc:
        warnings.warn(f"{out_dir / 'results.png'}: not drawn ({type(exc).__name__}: {exc})",
                      stacklevel=1)
    if figures.get("plots"):
        print(f"evaluation figures: {Path(figures['plots'][0]).parent} "
              f"({', '.join(Path(f).name for f in figures['plots'])})", flush=True)
    if figures.get("plots_error"):
        warnings.warn(f"evaluation figures not drawn: {figures['plots_error']}", stacklevel=1)
