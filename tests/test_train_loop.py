"""`hvd-yolo train` as users run it: the real loop's step sequence, logging and start-up checks.

Every run goes through the command line under mpirun (tests/mpi_harness.py, with timeouts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.convert import convert_dataset
from tests.fixtures.train_runs import read_jsonl
from tests.mpi_harness import run_cli

pytestmark = pytest.mark.mpi


def step_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"data.train={data}", "--set", "data.workers=0",
            "--set", f"run.out_dir={out}", "--set", "run.progress=false",
            "--set", "dist.threads=1", *extra]


# 8 synthetic images in 2 shards of 4: 2 ranks x 2 images x accumulate 2 is all of them
SHARDS = {"images": 8, "seed": 5, "shards": 2, "size_range": (64, 112)}


# ------------------------------------------------------------------ accumulation through Horovod
STEPS = 3
COMMON = ("--set", "input.multiscale=true", "--set", "input.min_size=64",
          "--set", "input.max_size=128", "--set", "input.every=1", "--set", "input.size=96",
          "--set", "model.freeze_bn=true", "--set", "dist.compression=none",
          "--set", f"optim.epochs={STEPS}", "--set", "optim.warmup_steps=1",
          "--set", "optim.momentum=0.9")


@pytest.fixture(scope="module")
def accumulation_runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 3 optimizer steps two ways: 2 ranks x batch 2 x accumulate 2 (backward passes
    per step in Horovod's DistributedOptimizer) and 1 rank x batch 8.

    Each step's global batch is the whole dataset in both runs, and augmentation and the
    multi-scale size are functions of (seed, epoch, sample) and (seed, step), so the two runs
    see the same images at the same sizes. BatchNorm normalises with its running statistics
    (``model.freeze_bn``): with batch statistics a batch of 2 and one of 8 give different
    outputs, so no per-image loss could make the steps equal. The per-rank LR is scaled so the
    global LR (lr x world x accumulate) is the same. Default SGD, EMA and clipping.
    """
    tmp = tmp_path_factory.mktemp("accumulation")
    two, one = tmp / "two_ranks", tmp / "one_rank"
    run_cli(train_args(shards, two, *COMMON, "--set", "optim.batch_size=2",
                       "--set", "optim.accumulate=2", "--set", "optim.lr=0.005"),
            np=2, timeout=400)
    run_cli(train_args(shards, one, *COMMON, "--set", "optim.batch_size=8",
                       "--set", "optim.lr=0.02"), np=1, timeout=400)
    return two, one


def test_two_ranks_accumulating_equal_one_rank_with_the_whole_batch(
        accumulation_runs: tuple[Path, Path]) -> None:
    """The weights (and their EMA) after 3 steps agree per tensor to 1e-4 of the tensor's
    scale, far tighter than how far the steps moved them."""
    from hvd_yolo.model.yolov3 import build_model

    two, one = (torch.load(p / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
                for p in accumulation_runs)
    assert two["step"] == one["step"] == STEPS
    torch.manual_seed(0)  # the loop's initial weights (run.seed 0)
    initial = build_model("yolov3-tiny", 3).state_dict()
    moved = 0.0
    for part in ("model", "ema"):
        a = two[part] if part == "model" else two["ema"]["model"]
        b = one[part] if part == "model" else one["ema"]["model"]
        for name, ref in b.items():
            if not ref.is_floating_point():
                continue
            scale = ref.abs().max().item() + 1e-12
            diff = (a[name] - ref).abs().max().item()
            assert diff <= 1e-4 * scale, f"{part} {name}: differs by {diff} (scale {scale})"
            if part == "model":
                moved = max(moved, (ref - initial[name]).abs().max().item() / scale)
    assert moved > 1e-2, f"the weights barely moved ({moved}): the comparison would prove nothing"


def test_logged_loss_is_the_mean_of_the_accumulation_window(
        accumulation_runs: tuple[Path, Path]) -> None:
    """The loss logged for a step is the mean over its micro-batches and ranks, i.e. the loss of
    the whole global batch: equal to the 1-rank run's, step by step (not the last micro-batch's).
    Each rank's own log holds its window's mean."""
    two, one = accumulation_runs
    a, b = step_records(two), step_records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["size"] == rb["size"]
        for key in ("loss", "box", "obj", "cls"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), (ra["step"], key, ra, rb)
    ranks = [read_jsonl(two / "ranks" / f"rank{r}.jsonl") for r in (0, 1)]
    for ra, r0, r1 in zip(a, *ranks):
        assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(ra["loss"], rel=1e-6)


# ------------------------------------------------------------------ logging
def test_log_every_zero_logs_the_last_step_only(shards: Path, tmp_path: Path) -> None:
    """``run.log_every=0`` turns periodic metric lines off (it divided by zero)."""
    out = tmp_path / "run"
    run_cli(train_args(shards, out, "--set", "input.size=64", "--set", "optim.batch_size=4",
                       "--set", "run.log_every=0", "--set", "run.max_steps=3",
                       "--set", "optim.epochs=5"), np=1, timeout=300)
    assert [r["step"] for r in step_records(out)] == [3]
    assert len(read_jsonl(out / "ranks" / "rank0.jsonl")) == 3


# ------------------------------------------------------------------ start-up checks
def test_validation_classes_that_differ_from_training_fail_at_start(shards: Path,
                                                                    tmp_path: Path) -> None:
    """A validation set converted with another class list (renamed, reordered) is refused by
    every rank before the first step, naming both data sets and the classes that differ
    (training went on and printed per-class AP under the wrong names)."""
    src = write_yolo_dataset(tmp_path / "src", 3, seed=7, size_range=(64, 96))
    (src / "data.yaml").write_text("nc: 3\nnames:\n  0: circle\n  1: triangle\n  2: cone\n")
    val = tmp_path / "val"
    convert_dataset("yolo", src, val, shards=1)
    out = tmp_path / "run"
    res = run_cli(train_args(shards, out, "--set", f"data.val={val}", "--set", "input.size=64",
                             "--set", "optim.batch_size=2"), np=2, timeout=300, check=False)
    assert res.returncode != 0 and not res.timed_out, res.output
    line = next((t for t in res.rank_lines(0) if t.startswith("hvd-yolo train: error:")), None)
    assert line is not None, res.output
    assert f"data.val={val}" in line and f"data.train={shards}" in line, line
    assert "class 1 is 'square' in training, 'triangle' here" in line, line
    assert "class 2 is 'triangle' in training, 'cone' here" in line, line
    assert "Traceback" not in res.output, res.output
    assert not (out / "ranks" / "rank0.jsonl").exists()  # no step was taken
