"""PowerSGD (hvd_yolo.comm.powersgd) on 2 real ranks: exact for low-rank gradients, error feedback
keeps what compression left out, every rank applies the same update, and `hvd-yolo train`
with dist.compression=powersgd keeps the ranks together and resumes after a kill -9."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hvd_yolo import checkpoint
from hvd_yolo.comm.powersgd import matrix_shape, wire_elements
from hvd_yolo.launch import hvd_yolo_argv
from tests.fixtures.train_runs import WEIGHTS_AT_SAVE, kill_after_checkpoint, losses, resumed_line, train_args
from tests.mpi_harness import mpirun_argv, run_job, run_python

pytestmark = pytest.mark.mpi

SETUP = """
    import hashlib, json, torch
    from hvd_yolo.comm import horovod as dist
    from hvd_yolo.comm.powersgd import PowerSGDSync

    ctx = dist.init(threads=1)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(32, 64, 3)  # weight [64, 32, 3, 3] -> M [64, 288]; bias uncompressed
    opt = PowerSGDSync(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                            rank=RANK, start_step=START, accumulate=ACC, seed=0,
                            warmup_compression="WARMUP")

    def backward_with(grads):
        # real backward passes (the hooks start the allreduces) whose gradient is grads
        for _ in range(ACC):
            loss = sum((p * g).sum() for p, g in zip(model.parameters(), grads)) / ACC
            loss.backward()

    def digest(t):
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
"""


def setup(rank: int, start: int, acc: int, warmup: str = "none") -> str:
    """SETUP for a PowerSGDSync of this rank, start step, accumulation and warm-up compression."""
    return (SETUP.replace("RANK", str(rank)).replace("START", str(start))
            .replace("ACC", str(acc)).replace("WARMUP", warmup))


def test_shapes_worth_compressing() -> None:
    assert matrix_shape((64, 32, 3, 3), 4) == (64, 288)
    assert matrix_shape((64,), 4) is None  # biases and BatchNorm: as they are
    assert matrix_shape((8, 4, 1, 1), 4) is None  # rank 4 would not halve 32 numbers
    assert wire_elements((64, 32, 3, 3), 4) == (64 + 288) * 4
    assert wire_elements((64,), 4) == 64


def test_a_gradient_of_rank_r_is_transmitted_exactly_and_counted() -> None:
    """Each rank's gradient is rank 1, so their mean has rank 2 <= r = 4: PowerSGD's update is
    the exact mean (to float rounding), the bias is averaged as is, every rank gets the same
    bytes, and the counted payload is P + Q + bias (what wire_elements says)."""
    res = run_python(setup(4, 0, 2) + """
    g = torch.Generator().manual_seed(10 + ctx.rank)
    grads = [(torch.randn(64, 1, generator=g) @ torch.randn(1, 288, generator=g)).view(64, 32, 3, 3),
             torch.randn(64, generator=g)]
    backward_with(grads)
    opt.synchronize()
    mean = [dist.allreduce_mean(t, "test.mean").float() for t in grads]
    err = max(float((p.grad - m).abs().max() / m.abs().max()) for p, m in zip(model.parameters(), mean))
    print("result=" + json.dumps({"err": err, "bytes": opt.bytes_sent,
          "digest": [digest(p.grad) for p in model.parameters()]}), flush=True)
    """, np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    for r in (0, 1):
        assert got[r]["err"] < 1e-5, got[r]
        assert got[r]["bytes"] == 4 * (wire_elements((64, 32, 3, 3), 4) + 64), got[r]
    assert got[0]["digest"] == got[1]["digest"], got


def test_a_step_cut_short_by_an_elastic_reset_leaves_nothing_behind() -> None:
    """A step whose backward ran (its first-round allreduces in flight) but never reached
    synchronize(), as when a rank dies mid-step: after discard_step() the next step's update is
    exactly a fresh PowerSGDSync's for the same gradients. Before discard_step existed the stale
    handles were waited for and the hooks, counting past ``accumulate``, started nothing: the
    update was the dead step's (here), or the ranks hung (in an elastic run)."""
    res = run_python(setup(2, 0, 1) + """
    g = torch.Generator().manual_seed(30 + ctx.rank)
    cut = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    backward_with(cut)  # the step cut short: allreduces started, no synchronize()
    for handle, _, _ in opt.pending.values():
        dist.wait(handle)  # (the reset ends them: Horovod restarts)
    opt.discard_step()
    backward_with(grads)
    opt.synchronize()
    after = [p.grad.clone() for p in model.parameters()]
    # the same gradients through a fresh PowerSGDSync on a model of the same shape
    model = torch.nn.Conv2d(32, 64, 3)
    fresh = PowerSGDSync(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                         rank=2, start_step=0, accumulate=1, seed=0)
    backward_with(grads)
    fresh.synchronize()
    gap = max(float((a - p.grad).abs().max()) for a, p in zip(after, model.parameters()))
    print("result=" + json.dumps({"gap": gap}), flush=True)
    """, np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    assert all(got[r]["gap"] == 0.0 for r in (0, 1)), got


@pytest.mark.parametrize("warmup", ["fp16", "none"])
def test_the_warm_up_averages_whole_gradients_in_its_compression(warmup: str) -> None:
    """Before start_step every gradient is averaged whole: with warmup_compression=fp16 (the
    default) as fp16 on the wire (half the bytes, the mean to fp16 rounding), with none as the
    exact fp32 mean; the same update on both ranks either way."""
    res = run_python(setup(2, 1, 1, warmup) + """
    g = torch.Generator().manual_seed(40 + ctx.rank)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    backward_with(grads)
    opt.synchronize()
    mean = [dist.allreduce_mean(t, "test.mean").float() for t in grads]
    err = max(float((p.grad - m).abs().max() / m.abs().max()) for p, m in zip(model.parameters(), mean))
    print("result=" + json.dumps({"err": err, "bytes": opt.bytes_sent,
          "dtype": str(model.weight.grad.dtype),
          "digest": [digest(p.grad) for p in model.parameters()]}), flush=True)
    """, np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    width = 2 if warmup == "fp16" else 4
    for r in (0, 1):
        assert got[r]["bytes"] == width * (64 * 32 * 3 * 3 + 64), got[r]
        assert got[r]["dtype"] == "torch.float32", got[r]
        if warmup == "fp16":
            assert 1e-6 < got[r]["err"] < 2e-3, got[r]  # fp16 rounding, no more
        else:
            assert got[r]["err"] < 1e-6, got[r]
    assert got[0]["digest"] == got[1]["digest"], got


def test_error_feedback_carries_what_compression_left_out() -> None:
    """Full-rank gradients at rank 1 over 6 steps (the first uncompressed: start_step 1): the
    updates applied plus the ranks' mean residual add up to the sum of the mean true gradients
    (error feedback's telescoping sum); the updates are lossy (not the mean) and identical on
    both ranks, step by step."""
    res = run_python(setup(1, 1, 1) + """
    g = torch.Generator().manual_seed(20 + ctx.rank)
    true_sum = [torch.zeros_like(p) for p in model.parameters()]
    sent_sum = [torch.zeros_like(p) for p in model.parameters()]
    digests, lossy = [], []
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        backward_with(grads)
        opt.synchronize()
        mean = dist.allreduce_mean(grads[0], "test.mean").float()
        lossy.append(float((model.weight.grad - mean).norm() / mean.norm()))
        for t, s, gr, p in zip(true_sum, sent_sum, grads, model.parameters()):
            t += gr
            s += p.grad
        digests.append(digest(model.weight.grad))
        opt.zero_grad()
    residual = opt.error["weight"].view(64, 32, 3, 3)
    mean_true = dist.allreduce_mean(true_sum[0], "test.true").float()
    mean_residual = dist.allreduce_mean(residual, "test.residual").float()
    gap = float((sent_sum[0] + mean_residual - mean_true).abs().max() / mean_true.abs().max())
    print("result=" + json.dumps({"gap": gap, "lossy": lossy, "digests": digests,
          "residual": float(residual.norm() / true_sum[0].norm())}), flush=True)
    """, np=2, timeout=120)
    got = {r: json.loads(v) for r, v in res.values("result").items()}
    assert sorted(got) == [0, 1], res.output
    for r in (0, 1):
        assert got[r]["gap"] < 1e-5, got[r]
        assert got[r]["residual"] > 0.1, got[r]  # a residual worth carrying (this rank's)
        assert got[r]["lossy"][0] < 1e-6, got[r]  # before start_step: the exact mean
        assert min(got[r]["lossy"][1:]) > 0.3, got[r]  # rank 1 of a 64x288 random matrix
    assert got[0]["digests"] == got[1]["digests"], got


# ------------------------------------------------------------------ through `hvd-yolo train`


# 40 small images in 3 shards: 10 steps of batch 2 per epoch on 2 ranks.
SHARDS = {"images": 40, "seed": 5, "shards": 3, "size_range": (96, 128)}


@pytest.mark.slow
def test_powersgd_training_keeps_the_ranks_together_and_resumes_after_a_kill(
        shards: Path, tmp_path: Path) -> None:
    """dist.compression=powersgd (rank 2 from step 2) through `hvd-yolo train`: both ranks
    hold the same weights at every checkpoint; after kill -9 past the step-4 checkpoint,
    --resume auto continues from it to step 8 on the uninterrupted trajectory: every step's
    loss and the step-8 weights are the uninterrupted run's, since each rank's error feedback
    and the warm-started Q continue from the files beside the checkpoint. Resumed on 1 rank,
    they restart from zero, with a warning that says so."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = ("--set", "dist.compression=powersgd", "--set", "dist.powersgd_rank=2",
              "--set", "dist.powersgd_start_step=2", "--set", "run.checkpoint_every=2")

    def argv(out: Path, *extra: str) -> list[str]:
        return train_args(shards, out, *common, *extra, size=64, epochs=5)

    def weights(res) -> list[list[str]]:
        return [[line for line in res.rank_lines(r) if line.startswith("weights=")] for r in (0, 1)]

    res = run_job([sys.executable, "-c", WEIGHTS_AT_SAVE, *argv(ref, "--set", "run.max_steps=8")],
                  np=2, timeout=300)
    ref_saved = weights(res)
    assert len(ref_saved[0]) >= 4 and ref_saved[0] == ref_saved[1], ref_saved  # steps 2, 4, 6, 8
    kill_after_checkpoint(mpirun_argv(2) + hvd_yolo_argv(*argv(cut)), cut)
    res = run_job([sys.executable, "-c", WEIGHTS_AT_SAVE, *argv(
        cut, "--set", "run.max_steps=8", "--resume", "auto")], np=2, timeout=300)
    resumed_at = int(resumed_line(res).split("step ")[1].split()[0])
    assert resumed_at in (4, 6), res.output
    assert "restarts from zero" not in res.output, res.output
    saved = weights(res)
    assert saved[0] and saved[0] == saved[1], saved
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9)), (sorted(a), sorted(b))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    w_ref, w_cut = (float(x[0][-1].split("=")[1]) for x in (ref_saved, saved))
    assert abs(w_ref - w_cut) <= 1e-6 * abs(w_ref), (w_ref, w_cut)  # the step-8 weights
    assert checkpoint.load(cut / "checkpoints" / "last.pt")["step"] == 8
    files = sorted(p.name for p in (cut / "checkpoints" / "comm").iterdir())
    assert "step-00000008.rank0.pt" in files and "step-00000008.rank1.pt" in files, files

    # 1 rank: 20 steps an epoch; the 8 unread samples of epoch 0 are its steps 17 and 18
    res = run_job(hvd_yolo_argv(*argv(cut, "--set", "run.max_steps=18", "--resume", "auto")),
                  np=1, timeout=300)
    assert ("communication state (error feedback, warm start, counts) restarts from zero: "
            "the checkpoint's is of 2 ranks, this run has 1") in res.output, res.output
    assert max(losses(cut)) == 18
