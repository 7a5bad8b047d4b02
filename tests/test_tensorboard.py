"""run.tensorboard=true: the event files, read back with TensorBoard's own reader, hold every
number of metrics.jsonl (steps, evaluations, the summary) at its step."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorboard")


def test_tensorboard_scalars_equal_metrics_jsonl(plot_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (plot_run.out / "metrics.jsonl").read_text()
               .splitlines()]
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if isinstance(value, (int, float)) and key != "step":
                expected.setdefault(f"{r['type']}/{key}", {})[r["step"]] = float(value)
    assert {"step/loss", "step/lr", "eval/mAP", "eval/mAP50", "summary/best_mAP"} <= set(expected)
    assert len(expected["step/loss"]) == 8 and len(expected["eval/mAP50"]) == 2

    acc = EventAccumulator(str(plot_run.out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        got = {e.step: e.value for e in events}
        assert len(events) == len(got) == len(by_step), tag  # each step once
        assert sorted(got) == sorted(by_step), tag
        steps = sorted(by_step)
        np.testing.assert_allclose([got[s] for s in steps], [by_step[s] for s in steps],
                                   rtol=1e-6, atol=0, err_msg=tag)  # stored as float32
