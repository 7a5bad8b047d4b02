"""`hvd-yolo plan` on a simulated 2-node cluster, and the scaling model it predicts with."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvd_yolo import cluster, scaling
from hvd_yolo.launch import hvd_yolo_argv, mpirun_argv
from tests.fixtures.models import simulated_cluster
from tests.mpi_harness import run_argv

REPO = Path(__file__).resolve().parents[1]
NAME = f"p{os.getpid() % 100000}"
SUBNET = "198.18.5.0/24"
LINK = "200mbit"


@pytest.fixture(scope="module")
def sim() -> Iterator[dict]:
    yield from simulated_cluster(cluster.Spec(name=NAME, nodes=2, slots=1, link=LINK, subnet=SUBNET))


@pytest.mark.mpi
def test_plan_measures_the_link_and_predicts_every_mode(sim: dict, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    hosts = ",".join(f"{cluster.hostname(NAME, k)}:1" for k in (1, 2))
    argv = mpirun_argv(2, hosts=hosts, network=SUBNET, tag_output=True) + hvd_yolo_argv(
        "plan", "--model", "yolov3-tiny", "--size", "64", "--batch-size", "2", "--steps", "2",
        "--link-mib", "4", "--project", "8,64", "--threads", "1", "--link", LINK,
        "--json", str(out))
    res = run_argv(cluster.exec_argv(NAME, argv), timeout=420, cwd=REPO,
                   env={"OMP_NUM_THREADS": "1"})
    assert "recommended:" in res.output, res.output
    rec = json.loads(out.read_text())
    m = rec["measured"]
    assert m["world_size"] == 2 and m["nodes"] == 2 and m["ranks_per_node"] == 1
    # The link's bytes per second come from an allreduce through the tbf-limited link: below
    # its rate (nothing is faster than the link), and not absurdly below it.
    fraction = m["bw_bytes_per_s"] * 8 / cluster.rate_bps(LINK)
    assert 0.2 < fraction < 1.05, (fraction, res.output)
    assert rec["link_bps"] == cluster.rate_bps(LINK)
    assert f"the allreduce moved {fraction:.2f} of the {LINK} link" in res.output
    assert m["mpi_tiny_allreduce_s"] is not None and m["alpha_s"] > 0
    assert 0 <= m["overlap"] <= 1 and 0 < m["forward_share"] < 1 and m["contention"] >= 0
    assert rec["inputs"]["contention"] == m["contention"]
    modes = rec["modes"]
    assert {"fp32", "fp16", "powersgd", "local", "local_overlap"} <= set(modes)
    assert rec["recommended"] in modes
    for v in modes.values():
        assert v["img_per_sec"] > 0 and 0 < v["efficiency"] <= 1
    # Fewer bytes can only help in the model; PowerSGD sends fewer than fp16 here.
    assert modes["fp16"]["img_per_sec"] >= modes["fp32"]["img_per_sec"]
    assert rec["inputs"]["powersgd_bytes"] < 2 * m["params"]
    # The prediction for what plan itself ran (fp32, overlap on, 2 nodes) is near what it
    # measured: the model reproduces its own inputs' run (loose: a shared 2-core machine).
    ratio = modes["fp32"]["img_per_sec"] / m["img_per_sec_measured_fp32"]
    assert 0.6 < ratio < 1.6, (ratio, res.output)
    assert set(rec["projection"]) == {"8", "64"}


@pytest.mark.parametrize("args,message", [
    (["--size", "100"], "--size must be a positive multiple of 32, got 100"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--project", "8,lots"], "--project '8,lots': expected node counts"),
    (["--link", "fast"], "--link: link rate 'fast' is not a tc rate"),
])
def test_plan_rejects_bad_input_in_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(hvd_yolo_argv("plan", *args), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("hvd-yolo plan: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the model itself
def inputs(**kw) -> scaling.Inputs:
    base = dict(compute_s=1.0, backward_s=0.6, params=10_000_000, batch=8, alpha_s=1e-5,
                cycle_s=1e-3, bw=1e9, overlap=0.5, powersgd_bytes=4e5, local_steps=4)
    return scaling.Inputs(**{**base, **kw})


def test_allreduce_time_pays_the_cycle_once_per_round_and_alpha_per_hop() -> None:
    t = scaling.allreduce_s(8, 1e8, 2, alpha=1e-5, cycle=1e-2, bw=1e9)
    assert t == pytest.approx(2 * (1e-2 + 14 * 1e-5) + 14 / 8 * 0.1)
    assert scaling.allreduce_s(1, 1e8, 2, 1e-5, 1e-2, 1e9) == 0


def test_step_time_per_mode_follows_the_bytes_sent() -> None:
    x = inputs()
    # fp32: 40 MB, 1 round on 2 nodes: t_ar = 1e-3 + 2e-5 + 0.04; half hidden under backward.
    t_ar = 1e-3 + 2e-5 + 4e7 / 1e9
    assert scaling.step_s(x, 2, "fp32") == pytest.approx(1.0 + 0.5 * t_ar)
    assert scaling.step_s(x, 2, "fp16") < scaling.step_s(x, 2, "fp32")
    # Local SGD pays a 1/k share of one average, never hidden: of the fp16 change (default),
    # or of the fp32 weights.
    t_half = 1e-3 + 2e-5 + 2e7 / 1e9
    assert scaling.step_s(x, 2, "local") == pytest.approx(1.0 + t_half / 4)
    assert scaling.step_s(inputs(local_width=4), 2, "local") == pytest.approx(1.0 + t_ar / 4)
    # Overlapped, the average travels during the next 4 steps' compute: hidden where it fits,
    # and only what does not fit is paid (1/k per step).
    assert scaling.step_s(x, 2, "local_overlap") == pytest.approx(1.0)
    t_slow = 1e-3 + 2e-5 + 2e7 / 4e6
    assert scaling.step_s(inputs(bw=4e6), 2, "local_overlap") == pytest.approx(
        1.0 + (t_slow - 4.0) / 4)
    # A link too slow for backward to hide: everything beyond backward is exposed.
    slow = inputs(bw=1e7)
    t_ar = 1e-3 + 2e-5 + 4e7 / 1e7
    assert scaling.step_s(slow, 2, "fp32") == pytest.approx(1.0 + t_ar - 0.6)
    # One rank alone communicates nothing.
    assert scaling.step_s(x, 1, "fp32") == x.compute_s


def test_a_transfer_beside_compute_slows_it_by_the_contention() -> None:
    x = inputs(contention=0.2)
    # fp32: its 0.041 s allreduce is in flight beside backward, which slows by 0.2 of that.
    t_ar = 1e-3 + 2e-5 + 4e7 / 1e9
    assert scaling.step_s(x, 2, "fp32") == pytest.approx(1.0 + 0.2 * t_ar + 0.5 * t_ar)
    # Beside backward for at most backward's length.
    slow = inputs(bw=1e7, contention=0.2)
    t_slow = 1e-3 + 2e-5 + 4e7 / 1e7
    assert scaling.step_s(slow, 2, "fp32") == pytest.approx(1.0 + 0.2 * 0.6 + t_slow - 0.6)
    # Overlapped local SGD: the average (5 s at 4 MB/s) is in flight through the whole next
    # period (4 s of compute), which grows to 4.8 s, so 0.2 s is left to pay over 4 steps.
    t_avg = 1e-3 + 2e-5 + 2e7 / 4e6
    period = 4.0 + 0.2 * 4.0
    assert scaling.step_s(inputs(bw=4e6, contention=0.2), 2, "local_overlap") == pytest.approx(
        period / 4 + (t_avg - period) / 4)
    # Plain local SGD averages after the step: nothing beside compute.
    assert scaling.step_s(x, 2, "local") == scaling.step_s(inputs(), 2, "local")
    # One rank alone: nothing in flight.
    assert scaling.step_s(x, 1, "fp32") == 1.0


def test_contention_is_the_compute_lost_per_second_beside_backward() -> None:
    # 0.1 s more compute with overlap, beside 0.5 s of allreduce (shorter than backward).
    assert scaling.contention_of(1.1, 1.0, 0.5, 0.6) == pytest.approx(0.2)
    # Beside backward only: a 5 s allreduce counts backward's 0.6 s.
    assert scaling.contention_of(1.1, 1.0, 5.0, 0.6) == pytest.approx(0.1 / 0.6)
    assert scaling.contention_of(1.5, 1.0, 0.01, 0.6) == 1.0  # at most a core's worth
    assert scaling.contention_of(0.9, 1.0, 0.5, 0.6) == 0.0  # faster with overlap: none
    assert scaling.contention_of(1.1, 1.0, 0.0, 0.6) == 0.0  # nothing sent


def test_overlap_is_the_share_of_the_wait_backward_hid() -> None:
    assert scaling.overlap_of(1.0, 4.0) == pytest.approx(0.75)
    assert scaling.overlap_of(5.0, 4.0) == 0.0  # waited longer with overlap: none hidden
    assert scaling.overlap_of(0.0, 4.0) == 1.0
    assert scaling.overlap_of(0.1, 0.0) == 0.0  # nothing waited for without overlap


def test_hierarchical_allreduce_pays_fewer_hops_on_multi_gpu_nodes() -> None:
    x = inputs(gpus_per_node=8, alpha_s=1e-4, intra_bw=1e11)
    pred = scaling.predict(x, 64)
    assert pred["fp16_hier"]["step_s"] < pred["fp16"]["step_s"]
    assert "fp16_hier" not in scaling.predict(inputs(), 64)  # one GPU per node: no hierarchy


def test_recommend_keeps_exact_modes_unless_another_is_clearly_faster() -> None:
    pred = {"fp32": {"img_per_sec": 9.0}, "fp16": {"img_per_sec": 10.0},
            "powersgd": {"img_per_sec": 10.5}, "local": {"img_per_sec": 10.2}}
    assert scaling.recommend(pred) == "fp16"
    pred["powersgd"]["img_per_sec"] = 30.0
    assert scaling.recommend(pred) == "powersgd"


def test_powersgd_wire_elements_match_the_optimizers_rule() -> None:
    assert scaling.powersgd_wire_elements((256, 128, 3, 3), 4) == (256 + 128 * 9) * 4
    assert scaling.powersgd_wire_elements((256,), 4) == 256  # biases go as they are
    assert scaling.powersgd_wire_elements((8, 8, 1, 1), 4) == 64  # too small to halve
