"""Emulated GPU-cluster regimes (hvd_yolo.regime): the link rate computation and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from hvd_yolo import cluster, regime
from hvd_yolo.launch import hvd_yolo_argv

REPO = Path(__file__).resolve().parents[1]


def test_parse_reads_accelerator_and_rate() -> None:
    assert regime.parse("h100:10gbit") == regime.Regime("h100", 1e10)
    assert regime.parse("H100:25Gbit") == regime.Regime("h100", 25e9)
    assert regime.parse("h100:400mbit").link_bps == 4e8
    assert regime.parse("h100:100gbit").label == "h100:100gbit"


@pytest.mark.parametrize("text,message", [
    ("h100", "expected ACCELERATOR:RATE"),
    ("h100:fast", "expected ACCELERATOR:RATE"),
    ("tpu9:10gbit", "no figures for accelerator 'tpu9'"),
    ("h100:0gbit", "must be positive"),
])
def test_parse_refuses_what_it_cannot_emulate(text: str, message: str) -> None:
    with pytest.raises(regime.RegimeError, match=message):
        regime.parse(text)


def test_rate_is_the_target_link_scaled_by_the_compute_ratio() -> None:
    # The H100 trains YOLOv3 416 at 254 img/s; a CPU rank at 0.254 img/s is 1000x slower, so
    # 10 Gbit/s beside the H100 is 10 Mbit/s beside the CPU rank.
    r = regime.parse("h100:10gbit")
    assert regime.emulated_rate_bps(r, "yolov3", 416, 0.254) == pytest.approx(1e7)
    # Twice the host speed, twice the link; 25 Gbit/s is 2.5x 10 Gbit/s.
    assert regime.emulated_rate_bps(r, "yolov3", 416, 0.508) == pytest.approx(2e7)
    r25 = regime.parse("h100:25gbit")
    assert regime.emulated_rate_bps(r25, "yolov3", 416, 0.254) == pytest.approx(2.5e7)


def test_other_sizes_scale_the_accelerator_by_pixel_count() -> None:
    fig = regime.ACCELERATORS["h100"]["yolov3-tiny"]
    assert regime.accelerator_img_s("h100", "yolov3-tiny", fig.size) == fig.img_s
    # 320 px has (416/320)^2 = 1.69x fewer pixels than 416: the GPU does 1.69x the img/s.
    assert regime.accelerator_img_s("h100", "yolov3-tiny", 320) == pytest.approx(
        fig.img_s * 1.69)
    with pytest.raises(regime.RegimeError, match="no h100 figure for model 'resnet'"):
        regime.accelerator_img_s("h100", "resnet", 224)


def test_plan_link_gives_a_tc_rate_and_the_figures_it_came_from() -> None:
    plan = regime.plan_link("h100:10gbit", "yolov3-tiny", 320, 8, host_img_s=3.3)
    accel = 726.0 * (416 / 320) ** 2
    assert plan["accelerator_img_s"] == pytest.approx(accel)
    assert plan["link_bps"] == pytest.approx(1e10 * 3.3 / accel)
    assert plan["link"] == f"{round(1e7 * 3.3 / accel)}kbit"  # 26.9 Mbit/s
    assert plan["compute_ratio"] == pytest.approx(accel / 3.3)
    assert not plan["host_img_s_measured"]
    assert "gpu_check_h100.txt" in plan["source"]


def test_every_accelerator_figure_names_a_source_that_exists() -> None:
    for name, figures in regime.ACCELERATORS.items():
        for model, fig in figures.items():
            assert fig.img_s > 0 and fig.size % 32 == 0 and fig.batch > 0, (name, model)
            if fig.source.startswith("measured: "):
                path = fig.source.split()[1].rstrip(",")
                text = (REPO / path).read_text()
                assert f"{fig.img_s:.1f} " in text, (name, model, path)
            else:
                assert "http" in fig.source, (name, model, "a published figure needs its URL")


@pytest.mark.parametrize("args,message", [
    (["--regime", "tpu9:10gbit", "--host-img-s", "3"], "no figures for accelerator 'tpu9'"),
    (["--regime", "h100:10gbit", "--link", "1gbit"], "give --link or --regime, not both"),
    (["--regime", "h100:10gbit", "--model", "resnet", "--host-img-s", "3"],
     "no h100 figure for model 'resnet'"),
])
def test_cluster_up_regime_errors_are_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(hvd_yolo_argv("cluster", "up", "--name", "noreg", *args),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("hvd-yolo cluster up: error: "), proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.mpi
def test_cluster_up_with_a_regime_sets_the_tbf_rate_it_computed() -> None:
    missing = cluster.missing_requirements()
    if missing:
        pytest.skip("no simulated cluster here, missing: " + "; ".join(missing))
    name = f"r{os.getpid() % 100000}"
    cluster.down(name)
    try:
        proc = subprocess.run(hvd_yolo_argv(
            "cluster", "up", "--name", name, "--nodes", "2", "--subnet", "198.18.4.0/24",
            "--regime", "h100:10gbit", "--model", "yolov3-tiny", "--size", "320",
            "--host-img-s", "3.27"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        want = regime.plan_link("h100:10gbit", "yolov3-tiny", 320, 8, host_img_s=3.27)
        assert f"link {want['link']}" in proc.stdout, proc.stdout
        info = cluster.status(name)
        assert info["spec"]["link"] == want["link"] and info["regime"]["link"] == want["link"]
        # Every node's link is shaped at that rate (tc prints it in its own units).
        for host, node in info["nodes"].items():
            m = re.search(r"rate (\d+(?:\.\d+)?)([KMG]?)bit", node["qdisc"])
            assert m, (host, node["qdisc"])
            bps = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
            assert bps == pytest.approx(want["link_bps"], rel=0.01), (host, node["qdisc"])
        saved = json.loads((cluster.state_dir(name) / "cluster.json").read_text())
        assert saved["regime"]["compute_ratio"] == pytest.approx(want["compute_ratio"])
    finally:
        cluster.down(name)
