"""Resume as users run it (`hvd-yolo train --resume` under mpirun): mid-epoch kill -9, corrupted
checkpoints, a changed config, killed checkpoint writes and one run per out_dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from hvd_yolo import checkpoint
from hvd_yolo.launch import hvd_yolo_argv
from tests.conftest import ShardSets
from tests.fixtures.train_runs import flip, kill_after_checkpoint, losses, resumed_line
from tests.fixtures.train_runs import train_args as run_args
from tests.mpi_harness import mpirun_argv, run_argv, run_cli, wait_for

pytestmark = pytest.mark.mpi


# 40 small images in 3 shards: 10 steps of batch 2 per epoch on 2 ranks.
SHARDS = {"images": 40, "seed": 5, "shards": 3, "size_range": (96, 128)}


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return run_args(shards, out, *extra, size=96, epochs=5)


@pytest.fixture(scope="module")
def base_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-rank run of 3 steps with a checkpoint after each (3 step files, last.pt)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_cli(train_args(shards, out, "--set", "run.max_steps=3", "--set", "run.checkpoint_every=1"),
            np=1, timeout=300)
    return out


def copy_run(base: Path, dst: Path) -> Path:
    """A copy keeping hard links (last.pt is step-3's file) and write times (pruning order)."""
    subprocess.run(["cp", "-a", str(base), str(dst)], check=True, timeout=60)
    return dst


def test_killed_mid_epoch_resumes_on_the_same_loss_trajectory(shards: Path, tmp_path: Path) -> None:
    """Kill -9 a 2-rank run right after its step-4 checkpoint (4 of the epoch's 10 steps: the
    sampler, EMA and optimizer are mid-epoch, last.pt may be mid-update); resume with
    --resume auto; every step up to 8 matches an uninterrupted run to 1e-4 relative."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = ("--set", "run.checkpoint_every=2")
    res = run_cli(train_args(shards, ref, *common, "--set", "run.max_steps=8"), np=2, timeout=400)
    steps_per_epoch = int(res.output.split(" steps/epoch")[0].rsplit(" ", 1)[1])
    assert steps_per_epoch > 5, res.output

    kill_after_checkpoint(mpirun_argv(2) + hvd_yolo_argv(*train_args(shards, cut, *common)), cut)

    res = run_cli(train_args(shards, cut, *common, "--set", "run.max_steps=8", "--resume", "auto"),
                  np=2, timeout=400)
    line = resumed_line(res)  # "<path>: epoch E, step S (P% of the epoch read)"
    epoch = int(line.split("epoch ")[1].split(",")[0])
    resumed_at = int(line.split("step ")[1].split()[0])
    assert epoch == 0 and resumed_at in (4, 6), res.output  # mid-epoch, from a checkpoint
    assert resumed_at % steps_per_epoch, "resumed at an epoch boundary: " + line
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9)), (sorted(a), sorted(b))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    # and the step-8 checkpoints hold the same weights, EMA and momentum
    ref_ck, cut_ck = (checkpoint.load(p / "checkpoints" / "last.pt") for p in (ref, cut))
    assert ref_ck["step"] == cut_ck["step"] == 8
    pairs = [(ref_ck["model"], cut_ck["model"]), (ref_ck["ema"]["model"], cut_ck["ema"]["model"]),
             ({k: v["momentum_buffer"] for k, v in ref_ck["optimizer"]["state"].items()},
              {k: v["momentum_buffer"] for k, v in cut_ck["optimizer"]["state"].items()})]
    for want, got in pairs:
        assert want.keys() == got.keys()
        for key in want:
            assert torch.allclose(want[key].float(), got[key].float(), rtol=1e-4, atol=1e-6), key
    assert ref_ck["ema"]["updates"] == cut_ck["ema"]["updates"] == 8


# ------------------------------------------------------------------ corrupted checkpoints
def test_corrupted_last_checkpoint_falls_back_and_killed_writes_are_removed(
        shards: Path, base_run: Path, tmp_path: Path) -> None:
    """--resume auto on 2 ranks, rank 1 blind to the checkpoints (a tmpfs over the folder in
    its own mount namespace: a node-local disk, or a shared file system that lags): rank 0
    alone picks the newest good checkpoint past a corrupted last.pt, and the others follow it
    by broadcast; rank 0 removes the temp file of a killed checkpoint write."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to hide the checkpoints from rank 1 (a private "
                    "mount namespace)")
    out = copy_run(base_run, tmp_path / "run")
    ckpt = out / "checkpoints"
    flip(ckpt / "last.pt")  # 64 flipped bytes: last.pt and step-3 (the same file)
    leftover = ckpt / ".step-00000009.pt.a1b2c3.tmp"  # a checkpoint write killed mid-way
    leftover.write_bytes(b"\0" * 100_000)
    cmd = hvd_yolo_argv(*train_args(shards, out, "--set", "run.max_steps=4", "--resume", "auto"))
    blind = ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs none {ckpt} && exec \"$@\"", "sh", *cmd]
    res = run_argv(mpirun_argv(1) + cmd + [":", "-np", "1", *blind], timeout=300)
    assert "last.pt: corrupted checkpoint" in res.output, res.output
    assert "step-00000002.pt instead" in res.output, res.output
    # 2 steps of batch 2 on 1 rank read 4 of 40 samples: 36 unread, 18 per rank, 9 of 10 batches left
    assert resumed_line(res).startswith(f"{ckpt / 'step-00000002.pt'}: epoch 0, step 1 ")
    assert "removed 1 unfinished checkpoint write(s)" in res.output, res.output
    assert not leftover.exists()
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (ckpt / "step-00000004.pt").samefile(ckpt / "last.pt")


def test_an_explicit_corrupted_checkpoint_is_an_error(shards: Path, base_run: Path,
                                                     tmp_path: Path) -> None:
    out = copy_run(base_run, tmp_path / "run")
    bad = out / "checkpoints" / "step-00000002.pt"
    flip(bad)
    res = run_cli(train_args(shards, out, "--set", "run.max_steps=4", "--resume", str(bad)),
                  np=2, timeout=300, check=False)
    assert res.returncode != 0 and not res.timed_out, res.output
    assert f"hvd-yolo train: error: {bad}: corrupted checkpoint" in res.output, res.output
    assert "Traceback" not in res.output, res.output


# ------------------------------------------------------------------ the config the checkpoint recorded
def test_resume_refuses_a_changed_seed_or_tail_naming_them(shards: Path, base_run: Path,
                                                          tmp_path: Path) -> None:
    out = copy_run(base_run, tmp_path / "run")
    res = run_cli(train_args(shards, out, "--set", "run.max_steps=4", "--set", "run.seed=7",
                             "--set", "data.tail=drop", "--resume", "auto"),
                  np=2, timeout=300, check=False)
    assert res.returncode != 0 and not res.timed_out, res.output
    assert "hvd-yolo train: error: cannot resume from" in res.output, res.output
    assert "run.seed is 0 in the checkpoint but 7 now" in res.output, res.output
    assert "data.tail is 'pad' in the checkpoint but 'drop' now" in res.output, res.output
    assert "Traceback" not in res.output, res.output


def test_resume_with_another_batch_size_re_derives_with_a_warning(shards: Path, base_run: Path,
                                                                 tmp_path: Path) -> None:
    """1 rank x batch 2 read 6 of 40 samples (3 steps); 2 ranks x batch 2 x accumulate 2 go on
    with the 34 unread: 17 per rank, 8 whole batches = 4 of the epoch's 5 steps, so from step 1
    (a smaller step than the checkpoint's: the step files are pruned by write order), never mid
    accumulation window."""
    out = copy_run(base_run, tmp_path / "run")
    res = run_cli(train_args(shards, out, "--set", "optim.accumulate=2", "--set", "run.max_steps=4",
                             "--set", "optim.lr=0.02", "--resume", "auto"), np=2, timeout=300)
    assert "world size is 1 in the checkpoint but 2 now" in res.output, res.output
    assert "optim.accumulate is 1 in the checkpoint but 2 now" in res.output, res.output
    assert "changed since the checkpoint (used as given now): optim.lr 0.01 -> 0.02" in res.output
    assert resumed_line(res).endswith("epoch 0, step 1 (15.0% of the epoch read)"), \
        res.output
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step-00000004.pt").samefile(out / "checkpoints" / "last.pt")


# ------------------------------------------------------------------ one run per out_dir
def test_a_second_run_into_a_busy_out_dir_fails_at_once(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = mpirun_argv(1) + hvd_yolo_argv(*train_args(shards, out, "--set", "optim.epochs=50"))
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        log = out / "ranks" / "rank0.jsonl"
        wait_for(log.exists, 300, "first step of the first run", first)
        before = log.read_text()
        res = run_cli(train_args(shards, out, "--set", "run.max_steps=1"), np=2, timeout=300,
                      check=False)
        assert res.returncode != 0 and not res.timed_out, res.output
        holder = json.loads((out / ".lock").read_text())  # the first run's rank 0
        assert (f"is in use by another training run (host {holder['host']}, pid {holder['pid']}, "
                in res.output), res.output
        assert "Traceback" not in res.output, res.output
        assert first.poll() is None, "the first run was disturbed"
        assert log.read_text().startswith(before)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# ------------------------------------------------------------------ another world size
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_unread_samples(
        shard_sets: ShardSets, tmp_path: Path) -> None:
    """13 images: 2 ranks get 7 each (one padded), 1 rank 13, so the two worlds' epochs differ
    in length. 2 steps of batch 2 on 2 ranks read 8 samples; the 5 unread are re-dealt to the
    1-rank world: 2 whole batches of its 6, so the epoch goes on at step 4 (a fraction taken
    over the new world's epoch length, or the old offset, would read some samples twice)."""
    data = shard_sets.get(13, seed=3, shards=3, size_range=(96, 128))
    out = tmp_path / "run"
    run_cli(train_args(data, out, "--set", "run.max_steps=2"), np=2, timeout=300)
    res = run_cli(train_args(data, out, "--set", "run.max_steps=8", "--resume", "auto"), np=1,
                  timeout=300)
    assert "world size is 2 in the checkpoint but 1 now" in res.output, res.output
    assert resumed_line(res).endswith("epoch 0, step 4 (61.5% of the epoch read)"), res.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == [1, 2, 5, 6, 7, 8], steps
