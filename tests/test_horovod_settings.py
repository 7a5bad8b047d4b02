"""dist.horovod_settings: explicit value > exported value > CPU default; GPU keeps Horovod's."""

from __future__ import annotations

import pytest

from hvd_yolo.comm import horovod as dist


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # horovod_settings writes os.environ: set-then-delete makes monkeypatch restore every knob
    # afterwards (a bare delenv of an absent variable records nothing, and the test's timeline
    # path leaked into later jobs).
    for var in dist.TUNING_KNOBS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_cpu_default_cycle_time() -> None:
    got = dist.horovod_settings(use_cuda=False)
    assert got["HOROVOD_CYCLE_TIME"] == str(dist.CPU_CYCLE_TIME_MS)
    assert "HOROVOD_FUSION_THRESHOLD" not in got  # left to Horovod


def test_gpu_keeps_horovod_default() -> None:
    got = dist.horovod_settings(use_cuda=True)
    assert "HOROVOD_CYCLE_TIME" not in got


def test_exported_value_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "3")
    assert dist.horovod_settings(use_cuda=False)["HOROVOD_CYCLE_TIME"] == "3"


def test_explicit_values_win(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "3")
    got = dist.horovod_settings(cycle_time_ms=2.5, fusion_threshold_mb=1, use_cuda=False,
                                timeline=str(tmp_path / "t.json"))
    assert got["HOROVOD_CYCLE_TIME"] == "2.5"
    assert got["HOROVOD_FUSION_THRESHOLD"] == str(2**20)
    assert got["HOROVOD_TIMELINE"] == str(tmp_path / "t.json")
