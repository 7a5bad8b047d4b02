"""Figures: `hvd-yolo train` writes results.png after each evaluation and the last evaluation's
figures; `hvd-yolo eval --plots` on 2 ranks writes PR data equal to pycocotools' precision for
the same detections; progress lines in logs, no carriage returns."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from hvd_yolo.plots import read_metrics, results_png
from hvd_yolo.progress import LineProgress, progress_bar

EVAL_FIGURES = ("pr_curve.png", "pr_curve.csv", "f1_curve.png", "confusion_matrix.png",
                "confusion_matrix.csv", "predictions.png")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_training_draws_results_png_and_the_last_evaluation_figures(plot_run):
    out, job = plot_run.out, plot_run.job
    rank0 = job.rank_lines(0)
    # results.png redrawn after each of the 2 evaluations; the figures after the last only
    assert sum(line == f"training curves: {out / 'results.png'}" for line in rank0) == 2
    assert sum(line.startswith("evaluation figures: ") for line in rank0) == 1
    assert png_size(out / "results.png") == (1200, 650)
    for name in EVAL_FIGURES:
        assert (out / "plots" / name).stat().st_size > 100, name
    w, h = png_size(out / "plots" / "predictions.png")
    assert w >= 600 and h >= 300
    # progress: one whole line per interval in a log (interval 0 here), no carriage returns
    assert "\r" not in job.output
    assert any(line.startswith("epoch 1: 4/4 batch (100%)") and "loss=" in line for line in rank0)
    assert not any("batch (" in line for line in job.rank_lines(1))  # rank 0 alone reports
    steps, evals = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9)) and [r["epoch"] for r in evals] == [0, 1]


def test_results_png_after_a_resume_keeps_each_steps_later_record(tmp_path):
    """A resumed run logs some steps twice (before the kill and after): the later counts."""
    log = tmp_path / "metrics.jsonl"
    rows = [{"type": "step", "step": s, "epoch": 0, "lr": 0.01, "loss": 1.0 / s, "box": 0.1,
             "obj": 0.2, "cls": 0.3} for s in (1, 2, 3)]
    rows += [{"type": "eval", "step": 3, "epoch": 0, "mAP": 0.1, "mAP50": 0.2}]
    rows += [{"type": "step", "step": 3, "epoch": 0, "lr": 0.01, "loss": 9.0, "box": 0.1,
              "obj": 0.2, "cls": 0.3}]  # step 3 again, after the resume
    rows += [{"type": "eval", "step": 6, "epoch": 1, "mAP": 0.3, "mAP50": 0.5}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + '{"type": "st')  # cut line
    steps, evals = read_metrics(log)
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    assert [r["mAP50"] for r in evals] == [0.2, 0.5]
    assert png_size(results_png(log, tmp_path / "results.png")) == (1200, 650)


@pytest.mark.mpi
def test_eval_plots_on_two_ranks_agree_with_pycocotools(plot_run, tmp_path):
    """The PR curve's data (matched pairs made on each rank, gathered) equals pycocotools'
    interpolated precision at IoU 0.5 for the detections the same run wrote."""
    from pycocotools.cocoeval import COCOeval

    from hvd_yolo.data.dataset import ShardDataset
    from hvd_yolo.metrics import _coco, _quiet
    from tests.mpi_harness import run_cli

    plots, results = tmp_path / "plots", tmp_path / "results.json"
    job = run_cli(["eval", "--checkpoint", str(plot_run.out / "checkpoints" / "last.pt"),
                   "--data", str(plot_run.val), "--plots", str(plots), "--results", str(results),
                   "--plots-iou", "0.3"], np=2, timeout=300)
    assert sorted(p.name for p in plots.iterdir()) == sorted(EVAL_FIGURES)
    said = [line for line in job.rank_lines(0) if line.strip()]  # tag-output may leave a bare tag
    assert said[-1].startswith(f"figures: {plots / 'pr_curve.png'}")
    ds = ShardDataset(plot_run.val)
    gt, names = ds.coco_ground_truth(), list(ds.class_names)
    coco_gt = _coco(gt)
    dets = json.loads(results.read_text())
    assert len(dets) > 50
    with _quiet():
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
    ref = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all areas, 100 detections
    rows = list(csv.DictReader((plots / "pr_curve.csv").open()))
    assert [float(r["recall"]) for r in rows] == pytest.approx(np.linspace(0, 1, 101))
    for k, name in enumerate(names):
        ours = np.array([float(r[name]) for r in rows])
        np.testing.assert_allclose(ours, ref[:, k], atol=1e-6, err_msg=name)
    assert ref.max() > 0  # the comparison is not all zeros
    # the confusion matrix counts every ground-truth box once (its row), at the stated IoU
    lines = (plots / "confusion_matrix.csv").read_text().splitlines()
    assert lines[0].startswith("# IoU >= 0.3; confidence >= 0.25; rows: true class")
    table = list(csv.reader(lines[1:]))
    assert table[0][1:] == [*names, "background"]
    true_rows = sum(int(v) for row in table[1:-1] for v in row[1:])
    assert true_rows == sum(1 for a in gt["annotations"] if not a["iscrowd"])


def test_line_progress_prints_whole_lines_per_interval():
    buf = io.StringIO()
    bar = progress_bar(range(5), total=5, desc="eval", unit="batch", file=buf, interval=0)
    assert isinstance(bar, LineProgress)
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2, 3, 4]
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert lines[-1].startswith("eval: 5/5 batch (100%), ") and lines[-1].endswith("loss=0.5")
    assert len(lines) == 5  # one per update (interval 0); the closing one would repeat the last
    quiet = io.StringIO()
    with progress_bar(total=100, desc="x", file=quiet, interval=3600) as slow:
        slow.update(50)
    assert quiet.getvalue().splitlines() == [quiet.getvalue().strip()]  # the closing line only


def test_progress_is_tqdm_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(total=3, desc="t", file=Terminal())
    assert type(bar).__module__.startswith("tqdm")
    bar.close()
