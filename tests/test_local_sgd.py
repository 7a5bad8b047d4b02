"""Local SGD (dist.sync=local, hvd_yolo.comm.local_sgd) through `hvd-yolo train` on 2 real ranks:
k=1 is synchronous SGD, k>1 keeps the ranks apart between averages and together right after
each, and a run killed with -9 resumes on the uninterrupted run's trajectory."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hvd_yolo import checkpoint
from hvd_yolo.launch import hvd_yolo_argv
from tests.fixtures.train_runs import kill_after_checkpoint, losses, resumed_line, train_args
from tests.mpi_harness import mpirun_argv, run_cli, run_job, run_python

# 40 small images in 3 shards: 10 steps of batch 2 per epoch on 2 ranks.
SHARDS = {"images": 40, "seed": 5, "shards": 3, "size_range": (96, 128)}


def args(shards: Path, out: Path, *extra: str) -> list[str]:
    return train_args(shards, out, "--set", "optim.clip_grad=0", *extra, size=64, epochs=5)


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"]["model"].items()}}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        scale = float(a[key].abs().max()) or 1.0
        diff = float((a[key] - b[key]).abs().max())
        assert diff <= rel * scale, (key, diff, scale)


@pytest.mark.mpi
@pytest.mark.slow
def test_local_sgd_every_step_is_synchronous_sgd(shards: Path, tmp_path: Path) -> None:
    """dist.sync=local with local_steps=1 (weights averaged after every step) ends with the
    weights and EMA of gradient allreduce (fp32, no clipping: SGD's update is linear in the
    gradient and momentum), per tensor to 1e-4 of its scale, and logs the same losses.
    model.freeze_bn: BatchNorm over 2 images of 64 px (2x2 maps in the last layers) amplifies
    float rounding differences to 1e-4 within 3 steps; with it the runs agree to 1e-6."""
    sync, local = tmp_path / "sync", tmp_path / "local"
    common = ("--set", "run.max_steps=5", "--set", "dist.compression=none",
              "--set", "model.freeze_bn=true")
    run_cli(args(shards, sync, *common), np=2, timeout=300)
    run_cli(args(shards, local, *common, "--set", "dist.sync=local", "--set",
                 "dist.local_steps=1"), np=2, timeout=300)
    assert_close(weights(sync / "checkpoints" / "last.pt"),
                 weights(local / "checkpoints" / "last.pt"), 1e-4)
    a, b = losses(sync), losses(local)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


# two ranks, a small model, local_steps=2, each rank's own inputs (COMPRESSION, OVERLAP filled in)
SETUP = """
    import hashlib, json, torch
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.comm.local_sgd import LocalSGDSync, model_tensors

    ctx = dist.init(threads=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
    opt = LocalSGDSync(torch.optim.SGD(model.parameters(), lr=0.1), model, local_steps=2,
                       compression="COMPRESSION", overlap=OVERLAP)
    dist.broadcast_state(model)
    opt.start_at(0)  # as the loop does, after the broadcast
    g = torch.Generator().manual_seed(50 + ctx.rank)
"""


def script(body: str, compression: str, overlap: bool) -> str:
    """SETUP followed by ``body``, for ``compression`` with or without overlap."""
    return (SETUP + body).replace("COMPRESSION", compression).replace("OVERLAP", str(overlap))


CHANGES = """
    out = []
    for step in range(1, 7):
        model(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
        opt.synchronize()
        opt.step()
        opt.zero_grad()
        before = [t.clone() for t in model_tensors(model)]
        exact = [dist.allreduce_mean(t, f"test.exact.{i}").float() for i, t in enumerate(before)]
        start = [s.clone() for s in opt.start] if opt.start is not None else before
        sent = opt.bytes_sent
        if opt.after_step():
            # how far from the exact fp32 mean, against how far the tensors moved since the
            # previous average (what fp16 rounds), and how far apart the ranks were
            err = max(float((t - e).abs().max()) for t, e in zip(model_tensors(model), exact))
            moved = max(float((b - s).abs().max()) for b, s in zip(before, start))
            apart = max(float((b - e).abs().max()) for b, e in zip(before, exact))
            digest = hashlib.sha256(b"".join(t.numpy().tobytes()
                                             for t in model_tensors(model))).hexdigest()
            out.append({"step": step, "bytes": opt.bytes_sent - sent, "err": err,
                        "moved": moved, "apart": apart, "digest": digest})
    print("result=" + json.dumps({"averages": out,
          "numel": sum(t.numel() for t in model_tensors(model))}), flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("compression", ["fp16", "none"])
def test_averages_send_the_change_in_fp16_or_the_weights_in_fp32(compression: str) -> None:
    """local_steps=2, on 2 real ranks: every average leaves both ranks the same tensors; with
    compression=fp16 each average sends every rank's change since the last one (the first:
    since start_at) as fp16, 2 bytes a number, and the tensors land within fp16 rounding of
    that change (1e-3 of it) of the exact mean; with none, the weights in fp32 (4 bytes), the
    exact mean."""
    res = run_python(script(CHANGES, compression, False), np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    width = 2 if compression == "fp16" else 4
    for r in (0, 1):
        averages = got[r]["averages"]
        assert [a["step"] for a in averages] == [2, 4, 6], averages
        for a in averages:
            assert a["bytes"] == width * got[r]["numel"], a
            assert a["apart"] > 1e-4, a  # each rank had stepped on its own gradients
            if compression == "fp16":
                assert 0 < a["err"] < 1e-3 * a["moved"], a
            else:
                assert a["err"] < 1e-6, a
    assert [a["digest"] for a in got[0]["averages"]] == [a["digest"] for a in got[1]["averages"]]


OVERLAP = """
    def flat(tensors):
        return torch.cat([t.flatten() for t in tensors])

    def digest(tensors):
        return hashlib.sha256(flat(tensors).numpy().tobytes()).hexdigest()

    out, sent = [], []
    for step in range(1, 9):
        model(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
        opt.synchronize()
        opt.step()
        opt.zero_grad()
        before = flat(model_tensors(model))
        start = flat(opt.start)
        own = opt.in_flight.own.clone() if opt.in_flight else None
        # the exact fp32 mean of the ranks' changes in flight (what the average approximates)
        exact = dist.allreduce_mean(own, f"test.exact.{step}") if own is not None else None
        mean = dist.allreduce_mean(before, f"test.mean.{step}")
        bytes_before = opt.bytes_sent
        due = opt.after_step()
        sent.append(opt.bytes_sent - bytes_before)
        if not due:
            continue
        rec = {"step": step, "landed": own is not None, "anchor": digest(opt.start),
               "apart": float((before - mean).abs().max())}
        if own is not None:
            # the tensors held alike moved by the average change; each rank's weights swapped
            # its own change for it and kept the rest of what it learned
            rec["err"] = float((flat(opt.start) - start - exact).abs().max())
            rec["moved"] = float(exact.abs().max())
            rec["kept"] = float(((flat(model_tensors(model)) - flat(opt.start))
                                 - (before - start - own)).abs().max())
        out.append(rec)
    opt.average_all()  # before a checkpoint: lands the average in flight, then averages all
    print("result=" + json.dumps({"averages": out, "sent": sent,
          "final": digest(model_tensors(model)), "in_flight": opt.in_flight is not None,
          "numel": sum(t.numel() for t in model_tensors(model))}), flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("compression", ["fp16", "none"])
def test_overlapped_averages_land_one_period_late_keeping_each_ranks_progress(
        compression: str) -> None:
    """dist.local_overlap, local_steps=2, on 2 real ranks: the average started at a period's
    end goes in 2 slices, one at that step and one after the next, and lands at the next
    period's end (steps 4, 6, 8, not 2): the tensors held alike become the same on both ranks
    and move by the ranks' mean change (within fp16 rounding of it, or exactly in fp32), each
    rank's weights keep what it learned meanwhile (1e-6), the ranks stay apart between
    checkpoints, and average_all lands the last one and leaves them identical."""
    res = run_python(script(OVERLAP, compression, True), np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    width = 2 if compression == "fp16" else 4
    for r in (0, 1):
        averages, numel = got[r]["averages"], got[r]["numel"]
        assert [(a["step"], a["landed"]) for a in averages] == [
            (2, False), (4, True), (6, True), (8, True)], averages
        # a slice every step from the first average on: half the change (2 bytes a number in
        # fp16, 4 in fp32), so two steps carry one whole average
        half = {width * ((numel + 1) // 2), width * (numel // 2)}
        assert got[r]["sent"][0] == 0, got[r]["sent"]
        assert all(b in half for b in got[r]["sent"][1:]), got[r]["sent"]
        assert sum(got[r]["sent"][2:8]) == 3 * width * numel, got[r]["sent"]
        for a in averages:
            assert a["apart"] > 1e-4, a  # the ranks never hold the same weights between
        for a in averages[1:]:
            assert a["kept"] < 1e-6, a
            if compression == "fp16":
                assert 0 < a["err"] < 1e-3 * a["moved"], a
            else:
                assert a["err"] < 1e-6, a
        assert not got[r]["in_flight"]
    assert [a["anchor"] for a in got[0]["averages"]] == [a["anchor"] for a in got[1]["averages"]]
    assert got[0]["final"] == got[1]["final"]


SPY = """
import sys
from hvd_yolo.comm import local_sgd

# Every rank prints a checksum of its weights before and after each average (product code runs).
cls = local_sgd.LocalSGDSync
after_step, average_all = cls.after_step, cls.average_all


def checksum(opt):
    return repr(sum(float(p.double().sum()) for p in opt.model.parameters()))


def spy_after_step(self):
    before = checksum(self)
    done = after_step(self)
    if done:
        print(f"average step={self.steps} before={before} after={checksum(self)}", flush=True)
    return done


def spy_average_all(self, ema=None):
    average_all(self, ema)
    print(f"save step={self.steps} after={checksum(self)}", flush=True)


cls.after_step, cls.average_all = spy_after_step, spy_average_all
from hvd_yolo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def averages(res, rank: int) -> list[dict[str, str]]:
    return [dict(part.split("=", 1) for part in line.split()[1:]) | {"kind": line.split()[0]}
            for line in res.rank_lines(rank) if line.startswith(("average ", "save "))]


@pytest.mark.mpi
@pytest.mark.parametrize("overlap", [False, True])
def test_ranks_agree_right_after_each_average_and_differ_between(shards: Path, tmp_path: Path,
                                                                 overlap: bool) -> None:
    """local_steps=3 after 2 warm-up steps of gradient allreduce: averages at steps 5 and 8
    (and before the step-8 checkpoint); before each, the ranks' weights differ (each stepped on
    its own gradients); right after, they are identical. Overlapped: the step-5 average (the
    first after the warm-up, fp32 weights) leaves them identical too; the step-8 one only
    starts (it would land at step 11), so they still differ; the checkpoint lands it and
    averages everything: identical."""
    out = tmp_path / "run"
    res = run_job([sys.executable, "-c", SPY, *args(
        shards, out, "--set", "dist.sync=local", "--set", "dist.local_steps=3",
        "--set", "dist.sync_warmup_steps=2", "--set", "run.max_steps=8",
        "--set", f"dist.local_overlap={str(overlap).lower()}")], np=2, timeout=300)
    r0, r1 = averages(res, 0), averages(res, 1)
    assert [(a["kind"], a["step"]) for a in r0] == [("average", "5"), ("average", "8"),
                                                    ("save", "8")], res.output
    assert [(a["kind"], a["step"]) for a in r1] == [(a["kind"], a["step"]) for a in r0]
    alike = [a["after"] == b["after"] for a, b in zip(r0, r1)]
    assert alike == ([True, False, True] if overlap else [True, True, True]), (r0, r1)
    for a, b in zip(r0, r1):
        if a["kind"] == "average":
            assert a["before"] != b["before"], (a, b)
    assert ("sync local every 3 steps (overlapped)" in res.output) == overlap, res.output
    assert "sync local every 3 steps" in res.output


@pytest.mark.mpi
@pytest.mark.slow
def test_killed_local_sgd_run_resumes_on_the_same_trajectory(shards: Path, tmp_path: Path) -> None:
    """kill -9 after the step-4 checkpoint (mid local period: averages every 3 steps), resume
    with --resume auto: every step's loss up to 8 and the step-8 weights and EMA match an
    uninterrupted run (a checkpoint is taken right after an average of everything, momentum
    included, so the resumed ranks start where the uninterrupted ones were)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = ("--set", "run.checkpoint_every=2", "--set", "dist.sync=local",
              "--set", "dist.local_steps=3")
    run_cli(args(shards, ref, *common, "--set", "run.max_steps=8"), np=2, timeout=300)
    kill_after_checkpoint(mpirun_argv(2) + hvd_yolo_argv(*args(shards, cut, *common)), cut)
    res = run_cli(args(shards, cut, *common, "--set", "run.max_steps=8", "--resume", "auto"),
                  np=2, timeout=300)
    resumed_at = int(resumed_line(res).split("step ")[1].split()[0])
    assert resumed_at in (4, 6), res.output
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9)), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert_close(weights(ref / "checkpoints" / "last.pt"), weights(cut / "checkpoints" / "last.pt"),
                 1e-4)
    # each rank's count of averages went beside the checkpoint, and came back on the resume
    comm = cut / "checkpoints" / "comm"
    assert {p.name for p in comm.iterdir()} >= {"step-00000008.rank0.pt", "step-00000008.rank1.pt"}
    assert "restarts from zero" not in res.output, res.output


@pytest.mark.parametrize("keys, message", [
    (["dist.sync=local", "dist.compression=powersgd"],
     "dist.sync=local with dist.compression=powersgd"),
    (["dist.sync=local", "dist.op=adasum", "optim.clip_grad=0"], "dist.op=adasum with dist.sync=local"),
    (["dist.compression=powersgd", "dist.op=adasum", "optim.clip_grad=0"],
     "dist.op=adasum with dist.compression=powersgd"),
    (["dist.sync=async"], "dist.sync='async': must be one of ['allreduce', 'local']"),
    (["dist.local_steps=0"], "dist.local_steps=0: must be >= 1"),
    (["dist.local_overlap=true"], "dist.local_overlap=true with dist.sync=allreduce"),
])
def test_combinations_without_meaning_are_refused_by_name(keys: list[str], message: str) -> None:
    from hvd_yolo import config

    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(None, ["data.train=x", *keys])


LATE = """
import sys, time
from hvd_yolo.comm import horovod as dist, local_sgd

# At each epoch's end (10 steps, a period's end) rank 1 starts the next average 2 s after rank
# 0, as a rank held up (say, by the OS) would: rank 0 reaches the join with it in flight.
cls = local_sgd.LocalSGDSync
after_step = cls.after_step


def late_after_step(self):
    if self.due() and self.steps % 10 == 0 and dist.rank() == 1:
        time.sleep(2)
    return after_step(self)


cls.after_step = late_after_step
from hvd_yolo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.mpi
def test_an_overlapped_average_in_flight_at_an_epochs_end_is_waited_for_before_the_join(
        shards: Path, tmp_path: Path) -> None:
    """dist.local_overlap with every epoch's end a period's end (10 steps an epoch, k=2) and
    rank 1 late there: the slice started at the epoch's last step is waited for before the
    epoch-end join (Horovod's join with an allreduce in flight hung a rank, or crashed it), so
    both epochs finish, every logged loss is finite and the last checkpoint is step 20's."""
    out = tmp_path / "run"
    run_job([sys.executable, "-c", LATE, *args(
        shards, out, "--set", "dist.sync=local", "--set", "dist.local_steps=2",
        "--set", "dist.local_overlap=true", "--set", "optim.epochs=2",
        "--set", "dist.stall_warning_s=10", "--set", "dist.stall_shutdown_s=40",
        "--set", "run.log_every=3")],  # no logged step at 10: its allreduce would wait for rank 1
        np=2, timeout=240)
    got = losses(out)
    assert sorted(got) == [3, 6, 9, 12, 15, 18, 20], sorted(got)
    assert all(math.isfinite(v) for v in got.values()), got
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 20
