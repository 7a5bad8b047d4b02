"""Distributed semantics of `hvd-yolo train` on 2 real ranks (mpirun): Adasum, BatchNorm
statistics at eval/save, a non-finite loss on one rank, a frozen rank.

Every job runs through tests/mpi_harness.py with a timeout: a hang fails with every rank's output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvd_yolo import config
from hvd_yolo.launch import hvd_yolo_argv
from tests.fixtures.train_runs import WEIGHTS_AT_SAVE, read_jsonl, train_args
from tests.mpi_harness import describe_failure, log_lines, mpirun_argv, run_cli, run_job, wait_for

pytestmark = pytest.mark.mpi




def rank_steps(out: Path, rank: int) -> list[dict]:
    return read_jsonl(out / "ranks" / f"rank{rank}.jsonl")


# ------------------------------------------------------------------ Adasum


def test_adasum_trains_on_two_ranks_with_an_unscaled_lr(shards: Path, tmp_path: Path) -> None:
    """dist.op=adasum through `hvd-yolo train` (accumulate 2: Horovod's Adasum optimizer steps in
    the backward hooks of the window's last pass). It crashed at the first step
    (skip_synchronize is unsupported by Adasum); the LR must not grow with the world size, and
    the ranks must hold the same weights."""
    out = tmp_path / "run"
    res = run_job([sys.executable, "-c", WEIGHTS_AT_SAVE, *train_args(
        shards, out, "--set", "dist.op=adasum", "--set", "optim.clip_grad=0",
        "--set", "optim.accumulate=2", "--set", "run.max_steps=3")], np=2, timeout=400)
    assert "lr 0.02, op adasum" in res.output, res.output  # 0.01 x accumulate 2, not x 2 ranks
    weights = res.values("weights")
    assert sorted(weights) == [0, 1] and weights[0] == weights[1], weights
    steps = [[r["step"] for r in rank_steps(out, r)] for r in (0, 1)]
    assert steps[0] == steps[1] == [1, 2, 3], steps
    assert all(r["loss"] == r["loss"] for r in rank_steps(out, 0))  # finite, not NaN
    assert (out / "checkpoints" / "last.pt").exists()


def test_adasum_with_gradient_clipping_is_refused_by_name() -> None:
    with pytest.raises(config.ConfigError, match=r"dist.op=adasum .*optim.clip_grad=0"):
        config.load(None, ["data.train=x", "dist.op=adasum"])


# ------------------------------------------------------------------ non-finite loss
NAN_ON_RANK1 = """
import os, sys
from hvd_yolo.model import loss

# Rank 1's third loss (batch 2 of its epoch) is NaN; everything else is the product's code.
if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
    forward, calls = loss.YoloLoss.forward, [0]

    def nan_once(self, *args, **kwargs):
        value, parts = forward(self, *args, **kwargs)
        calls[0] += 1
        return (value * float("nan") if calls[0] == 3 else value), parts

    loss.YoloLoss.forward = nan_once
from hvd_yolo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(
        shards: Path, tmp_path: Path) -> None:
    """One rank's NaN loss: every rank stops before step 3's update with one named error, exit
    non-zero. It used to raise on that rank only, leaving the other in its allreduce."""
    out = tmp_path / "run"
    res = run_job([sys.executable, "-c", NAN_ON_RANK1, *train_args(shards, out)], np=2,
                  timeout=240, check=False)
    assert not res.timed_out and res.returncode != 0, describe_failure(res, 240)
    errors = [line for r in (0, 1) for line in res.rank_lines(r) if "hvd-yolo train: error" in line]
    assert len(errors) == 1, res.output  # rank 0 reports once
    assert "not finite" in errors[0] and "at step 3" in errors[0], errors
    assert "rank 1 batch 2" in errors[0] and "rank 0" not in errors[0], errors
    assert [len(rank_steps(out, r)) for r in (0, 1)] == [2, 2]  # both stopped before step 3


# ------------------------------------------------------------------ a frozen rank
def rank_pid(out: Path, rank: int, launcher_pid: int) -> int | None:
    """The pid of ``rank`` of the run writing ``out`` (its environment names its rank)."""
    found = subprocess.run(["pgrep", "-f", f"run.out_dir={out}"], capture_output=True, text=True)
    for pid in (int(p) for p in found.stdout.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher_pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return pid
    return None


def test_a_frozen_rank_ends_the_job_naming_it(shards: Path, tmp_path: Path) -> None:
    """SIGSTOP rank 1 mid-training: the job ends non-zero within dist.stall_shutdown_s (plus
    launcher time), rank 0 naming rank 1 as not responding. It used to hang forever: Horovod's
    stall inspector runs in the coordinator's loop, which blocks in MPI on a frozen rank."""
    out = tmp_path / "run"
    argv = mpirun_argv(2) + hvd_yolo_argv(*train_args(
        shards, out, "--set", "optim.epochs=200", "--set", "data.workers=0",
        "--set", "dist.stall_warning_s=3", "--set", "dist.stall_shutdown_s=10"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    frozen = None
    try:
        wait_for(lambda: log_lines(out / "ranks" / "rank1.jsonl") >= 3, 300, "3 steps", proc)
        frozen = rank_pid(out, 1, proc.pid)
        assert frozen is not None, "rank 1 not found"
        os.kill(frozen, signal.SIGSTOP)
        t0 = time.time()
        try:
            output = proc.communicate(timeout=120)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the job hung with rank 1 stopped:\n" + proc.communicate()[0].decode())
        took = time.time() - t0
    finally:
        if frozen is not None:  # never leave a stopped process behind
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output
    assert "rank(s) 1 did not respond" in output, output
    assert "rank 0 at step" in output, output  # where the responding rank waited
    assert took < 100, (took, output)


# ------------------------------------------------------------------ BN statistics at eval/save
def test_printed_map_is_the_map_of_the_checkpoint_written_with_it(shards: Path,
                                                                  tmp_path: Path) -> None:
    """Without SyncBN each rank's BatchNorm statistics follow its own batches: averaged over the
    ranks before every save and eval, the mAP training prints on 2 ranks is `hvd-yolo eval`'s
    of the checkpoint written then (it was scored with each rank's own statistics before)."""
    out = tmp_path / "run"
    run_cli(train_args(shards, out, "--set", f"data.val={shards}", "--set", "optim.epochs=2",
                       "--set", "optim.lr=0.02", "--set", "eval.every=2"), np=2, timeout=400)
    printed = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    figures = tmp_path / "eval.json"
    run_cli(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", str(shards),
             "--batch-size", "8", "--json", str(figures)], np=2, timeout=300)
    scored = json.loads(figures.read_text())
    assert printed["mAP50"] > 0, printed  # a model that finds nothing would prove nothing
    assert scored["mAP"] == pytest.approx(printed["mAP"], abs=1e-9), (scored, printed)
    assert scored["mAP50"] == pytest.approx(printed["mAP50"], abs=1e-9), (scored, printed)
    # best.pt: linked after the evaluation to the step file it scored, its mAP in best.json
    ckpts = out / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    assert best["mAP"] == printed["mAP"] and best["step"] == printed["step"], (best, printed)
    assert os.path.samefile(ckpts / "best.pt", ckpts / best["file"])


def test_a_failing_evaluation_loses_no_epoch(shards: Path, tmp_path: Path) -> None:
    """The epoch's checkpoint is written before its evaluation: a corrupt validation image with
    data.on_corrupt=error ends the job in the evaluation, and the epoch is still saved (it was
    lost before: the checkpoint came after the evaluation)."""
    from hvd_yolo import checkpoint
    from tests.test_integrity import flip_image_bytes

    val = tmp_path / "val"
    shutil.copytree(shards, val)
    flip_image_bytes(val, 5)
    out = tmp_path / "run"
    res = run_cli(train_args(shards, out, "--set", f"data.val={val}", "--set", "optim.epochs=1",
                             "--set", "data.on_corrupt=error"), np=2, timeout=300, check=False)
    assert not res.timed_out and res.returncode != 0, describe_failure(res, 300)
    assert "hvd-yolo train: error" in res.output, res.output
    last = out / "checkpoints" / "last.pt"
    assert last.exists(), res.output
    state = checkpoint.load(last)
    assert state["epoch"] == 1 and state["step"] > 0, (state["epoch"], state["step"])


def test_a_resume_keeps_the_best_map_of_the_evaluation_after_the_checkpoint(
        shards: Path, tmp_path: Path) -> None:
    """The checkpoint predates its evaluation, so a resume takes best.pt's mAP from best.json:
    a later, worse evaluation must not replace best.pt (best_mAP was -1 after the resume)."""
    out = tmp_path / "run"
    run_cli(train_args(shards, out, "--set", f"data.val={shards}", "--set", "optim.epochs=1"),
            np=2, timeout=300)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    run_cli(train_args(shards, out, "--set", "optim.epochs=2", "--resume", "auto"), np=2,
            timeout=300)
    summary = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "summary"][-1]
    assert summary["best_mAP"] == best["mAP"], (summary, best)
