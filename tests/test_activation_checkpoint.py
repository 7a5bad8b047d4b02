"""Activation checkpointing (``model.checkpoint``): the same gradients, buffers and Horovod hooks.

In one process: every parameter's gradient, the loss and every BatchNorm buffer equal bitwise
those of ``none`` (the segments really recompute); each parameter's gradient-accumulator hook,
which Horovod's ``DistributedOptimizer`` starts its allreduce from, fires once per backward.
Through `hvd-yolo train` on 2 real ranks with multi-scale: the same weights as without.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hvd_yolo import config
from hvd_yolo.checkpoint import load
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.yolov3 import ConvLayer, build_model
from tests.fixtures.datagen import synthetic_shards
from tests.fixtures.train_runs import read_jsonl, train_args
from tests.mpi_harness import run_cli

torch.set_num_threads(1)

TARGETS = torch.tensor([[0, 1, 10, 10, 50, 40], [1, 2, 5, 20, 30, 60.0]])


def _backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, dict, dict, int]:
    """(loss, gradients, buffers, conv forward calls) of one training forward+backward."""
    calls = [0]

    def count(*_):
        calls[0] += 1
    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, ConvLayer)]
    model.train()
    loss, _ = YoloLoss(model)(model(x), TARGETS)
    loss.backward()
    for h in handles:
        h.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return loss.item(), grads, {k: b.clone() for k, b in model.named_buffers()}, calls[0]


@pytest.mark.parametrize("name", ["yolov3", "yolov3-tiny"])
def test_checkpointing_gives_the_same_gradients_and_buffers_per_tensor(name: str) -> None:
    torch.manual_seed(0)
    base = build_model(name, 3)
    x = torch.rand(2, 3, 96, 64)  # not square: any size divisible by 32
    loss0, grads0, bufs0, calls0 = _backward(copy.deepcopy(base), x)
    convs = sum(isinstance(m, ConvLayer) for m in base.modules())
    assert calls0 == convs
    for mode in ("backbone", "all"):
        model = copy.deepcopy(base)
        model.set_checkpoint(mode)
        loss, grads, bufs, calls = _backward(model, x)
        # The checkpointed segments ran again in backward (``all``: every conv layer).
        assert convs < calls <= 2 * convs, (mode, calls)
        if mode == "all":
            assert calls == 2 * convs, calls
        assert loss == loss0
        assert grads.keys() == grads0.keys() and len(grads) > 30
        for k in grads0:
            assert torch.equal(grads[k], grads0[k]), f"{mode}: gradient of {k} differs"
        # BatchNorm's running statistics are updated once, in the forward, not again when
        # a segment is recomputed.
        for k in bufs0:
            assert torch.equal(bufs[k], bufs0[k]), f"{mode}: buffer {k} differs"


def test_each_gradient_hook_fires_once_per_backward_with_checkpointing() -> None:
    """Horovod hooks each parameter's gradient accumulator (``p.expand_as(p).grad_fn``) and
    starts its allreduce there; it must fire exactly once per backward, during backward."""
    torch.manual_seed(0)
    model = build_model("yolov3", 3, checkpoint="all")
    fired: dict[str, int] = {}
    keep = []
    for name, p in model.named_parameters():
        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(lambda *_, n=name: fired.__setitem__(n, fired.get(n, 0) + 1))
        keep.append(acc)
    model.train()
    loss, _ = YoloLoss(model)(model(torch.rand(1, 3, 64, 64)), TARGETS[:1])
    assert not fired  # nothing before backward
    loss.backward()
    assert fired == {n: 1 for n, _ in model.named_parameters()}


def test_checkpointing_is_off_in_evaluation_and_without_grad(monkeypatch) -> None:
    """Only a training forward with grad enabled goes through torch.utils.checkpoint."""
    from hvd_yolo.model import yolov3

    torch.manual_seed(0)
    plain = build_model("yolov3-tiny", 3)
    model = copy.deepcopy(plain)
    model.set_checkpoint("all")
    used = []
    real = yolov3.checkpoint_segment
    monkeypatch.setattr(yolov3, "checkpoint_segment", lambda *a, **k: used.append(1) or real(*a, **k))
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(model.eval()(x), plain.eval()(x)):  # evaluation, grad enabled
        assert torch.equal(a, b)
    with torch.no_grad():
        model.train()(x)
    assert not used
    model.train()(x)
    assert len(used) == len(model._segments)


def test_bad_checkpoint_values_are_refused_by_name() -> None:
    with pytest.raises(config.ConfigError, match=r"model.checkpoint='stages'.*must be one of"):
        config.load(overrides=["data.train=x", "model.checkpoint=stages"])
    with pytest.raises(config.ConfigError, match=r"model.checkpoint=backbone with dist.sync_bn"):
        config.load(overrides=["data.train=x", "model.checkpoint=backbone", "dist.sync_bn=true"])
    with pytest.raises(ValueError, match="model.checkpoint='heads'"):
        build_model("yolov3", 3, checkpoint="heads")


@pytest.mark.mpi
def test_two_rank_training_with_checkpointing_ends_with_the_same_weights(
        tmp_path: Path) -> None:
    """`hvd-yolo train`, YOLOv3, 2 ranks, multi-scale 64..128 changing every step: backbone
    checkpointing ends with the weights (and BatchNorm statistics) of the run without."""
    shards = synthetic_shards(tmp_path / "data", 8, seed=7, shards=2, size_range=(96, 128))
    common = ["--set", "model.name=yolov3", "--set", "input.multiscale=true",
              "--set", "input.min_size=64", "--set", "input.max_size=128", "--set", "input.every=1",
              "--set", "optim.ema=false", "--set", "run.max_steps=2",
              "--set", "run.seed=2"]  # seed 2: sizes 64 then 96
    states = {}
    for mode in ("none", "backbone"):
        out = tmp_path / mode
        run_cli(train_args(shards, out, *common, "--set", f"model.checkpoint={mode}",
                           size=128, epochs=1), np=2, timeout=400)
        steps = read_jsonl(out / "ranks" / "rank0.jsonl")
        assert [r["step"] for r in steps] == [1, 2], steps
        states[mode] = (load(out / "checkpoints" / "last.pt")["model"],
                        [(r["size"], r["loss"]) for r in steps])
    (ref, log0), (got, log1) = states["none"], states["backbone"]
    assert len({size for size, _ in log0}) == 2, log0  # two input sizes in the run
    assert [s for s, _ in log1] == [s for s, _ in log0]
    assert [loss for _, loss in log1] == pytest.approx([loss for _, loss in log0], rel=1e-5)
    assert ref.keys() == got.keys()
    for k in ref:
        if ref[k].is_floating_point():
            scale = ref[k].abs().max().clamp_min(1e-12)
            assert ((got[k] - ref[k]).abs().max() / scale) < 1e-5, f"{k} differs"
        else:
            assert torch.equal(got[k], ref[k]), k
