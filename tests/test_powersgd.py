"""PowerSGD (hvd_yolo.powersgd) on 2 real ranks: exact for low-rank gradients, error feedback
keeps what compression left out, every rank applies the same update, and `hvd-yolo train`
with dist.compression=powersgd keeps the ranks together and resumes after a kill -9."""

from __future__ import annotations

import json

import pytest

from hvd_yolo.powersgd import matrix_shape, wire_elements
from tests.mpi_harness import run_python

pytestmark = pytest.mark.mpi

SETUP = """
    import hashlib, json, torch
    from hvd_yolo import dist
    from hvd_yolo.powersgd import PowerSGDOptimizer

    ctx = dist.init(threads=1)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(32, 64, 3)  # weight [64, 32, 3, 3] -> M [64, 288]; bias uncompressed
    opt = PowerSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                            rank=RANK, start_step=START, accumulate=ACC, seed=0)

    def backward_with(grads):
        # real backward passes (the hooks start the allreduces) whose gradient is grads
        for _ in range(ACC):
            loss = sum((p * g).sum() for p, g in zip(model.parameters(), grads)) / ACC
            loss.backward()

    def digest(t):
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
"""


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
    res = run_python(SETUP.replace("RANK", "4").replace("START", "0").replace("ACC", "2") + """
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


def test_error_feedback_carries_what_compression_left_out() -> None:
    """Full-rank gradients at rank 1 over 6 steps (the first uncompressed: start_step 1): the
    updates applied plus the ranks' mean residual add up to the sum of the mean true gradients
    (error feedback's telescoping sum); the updates are lossy (not the mean) and identical on
    both ranks, step by step."""
    res = run_python(SETUP.replace("RANK", "1").replace("START", "1").replace("ACC", "1") + """
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
