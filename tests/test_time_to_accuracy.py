"""The time-to-accuracy benchmark's summary over repeated runs (``--repeats``)."""

from __future__ import annotations

import pytest

from benchmarks import time_to_accuracy as tta


def _run(mode: str, m50: float, m: float, rc: int = 0) -> dict:
    return {"rc": rc, "mode": mode, "final_mAP50": m50, "final_mAP": m}


def test_repeated_runs_are_keyed_apart_and_summed_up_per_mode() -> None:
    assert [tta.run_key("fp16", r) for r in (1, 2, 3)] == ["fp16", "fp16_run2", "fp16_run3"]
    result = {"modes": {
        "fp32": _run("fp32", 0.84, 0.38), "powersgd_r4": _run("powersgd_r4", 0.84, 0.42),
        "fp32_run2": _run("fp32", 0.80, 0.34), "powersgd_r4_run2": _run("powersgd_r4", 0.78, 0.30),
        "powersgd_r4_run3": {"rc": 1, "mode": "powersgd_r4"}}}
    rows = {r["mode"]: r for r in tta.spread(result)}
    assert rows["fp32"]["runs"] == 2 and rows["powersgd_r4"]["runs"] == 2  # the failed run is out
    assert rows["fp32"]["mAP50_mean"] == pytest.approx(0.82)
    assert (rows["powersgd_r4"]["mAP50_min"], rows["powersgd_r4"]["mAP50_max"]) == (0.78, 0.84)
    assert rows["powersgd_r4"]["mAP_mean"] == pytest.approx(0.36)
    assert rows["powersgd_r4"]["mAP50_vs_fp32"] == pytest.approx(-0.01)
    assert "| powersgd_r4 | 2 | 0.810 (0.780-0.840) | 0.360 | -0.010 |" in tta.spread_table(
        list(rows.values()))


def test_without_fp32_there_is_no_difference_to_it() -> None:
    rows = tta.spread({"modes": {"fp16": _run("fp16", 0.85, 0.40)}})
    assert rows[0]["mAP50_vs_fp32"] is None
