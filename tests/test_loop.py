"""hvd_yolo.loop's pure parts: the plan's arithmetic (one formula for the fixed and the elastic
driver, fresh and resumed), the callback seam, and what importing the loop does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hvd_yolo.config import ConfigError, load
from hvd_yolo.loop import events
from hvd_yolo.loop.plan import make_plan, whole_steps


def cfg(*overrides: str):
    return load(None, ["data.train=x", "optim.batch_size=2", "optim.epochs=3",
                       "optim.warmup_steps=2", "optim.lr=0.01", *overrides])


def test_whole_steps_cut_a_partial_step() -> None:
    assert whole_steps(13, 2, 1) == 6
    assert whole_steps(13, 2, 2) == 6  # 6 batches = 3 steps of 2
    assert whole_steps(11, 2, 2) == 4  # 5 batches: the fifth alone is no step
    assert whole_steps(3, 2, 2) == 0


def test_a_fresh_run_plans_every_epoch() -> None:
    plan = make_plan(cfg(), epoch_samples=13, left_samples=13, epoch=0, world_scale=2)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.first) == (6, 6, 0)
    assert (plan.start_step, plan.total_steps, plan.stop_at) == (0, 18, 18)
    assert plan.base_lr == pytest.approx(0.02)  # lr x world scale x accumulate
    assert plan.lr(0) == pytest.approx(0.01) and plan.lr(1) == pytest.approx(0.02)  # warm-up


def test_a_resume_mid_epoch_skips_what_was_read_and_keeps_the_schedule() -> None:
    """Resumed with 8 of epoch 1's 13 samples unread: 4 batches left, so the first 2 are
    skipped; the step is re-derived (6 + 2) and the schedule's length is unchanged."""
    fresh = make_plan(cfg(), 13, 13, 0, 1)
    plan = make_plan(cfg(), 13, 8, 1, 1)
    assert (plan.first, plan.start_step) == (2, 8)
    assert plan.total_steps == fresh.total_steps == 18
    assert plan.lr(8) == fresh.lr(8)


def test_accumulation_counts_steps_not_batches() -> None:
    plan = make_plan(cfg("optim.accumulate=2"), 13, 13, 0, 1)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (6, 3, 9)
    assert plan.base_lr == pytest.approx(0.02)


def test_an_elastic_world_change_continues_from_the_committed_step() -> None:
    """The committed step 7 goes on; the schedule ends at the run's last step on this world:
    7 + the 2 steps left of epoch 1 + 4 for epoch 2 (8 samples a rank, batch 2)."""
    plan = make_plan(cfg(), epoch_samples=8, left_samples=4, epoch=1, world_scale=3, step=7)
    assert (plan.start_step, plan.first, plan.total_steps) == (7, 2, 13)


def test_max_steps_stops_early_without_shortening_the_schedule() -> None:
    plan = make_plan(cfg("run.max_steps=5"), 13, 13, 0, 1)
    assert (plan.total_steps, plan.stop_at) == (18, 5)


def test_too_few_samples_for_one_step_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"x: each rank gets 3 samples, fewer than one step of "
                                          r"optim.batch_size 2 x optim.accumulate 2"):
        make_plan(cfg("optim.accumulate=2"), 3, 3, 0, 1)


def test_events_call_their_subscribers_and_refuse_unknown_names() -> None:
    seen: list[dict] = []

    def record(**info) -> None:
        seen.append(info)

    events.on("save", record)
    events.emit("save", step=3, epoch=1, model=None)
    events.off("save", record)
    events.emit("save", step=4, epoch=1, model=None)
    assert seen == [{"step": 3, "epoch": 1, "model": None}]
    with pytest.raises(ValueError, match="event must be one of"):
        events.on("saved", print)


def test_importing_the_loop_registers_no_exit_handler() -> None:
    """Only a run registers its exit handler (killing stray loader workers), not an import."""
    code = ("import atexit, torch, horovod.torch, hvd_yolo.comm, hvd_yolo.evaluate, "
            "hvd_yolo.checkpoint, hvd_yolo.data.augment, tqdm\n"
            "before = atexit._ncallbacks()\n"
            "import hvd_yolo.loop.fixed, hvd_yolo.loop.elastic, hvd_yolo.commands.train\n"
            "print(atexit._ncallbacks() - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "0", out.stderr
