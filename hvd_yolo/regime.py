"""Emulated GPU-cluster regimes: the link rate that gives this machine a GPU cluster's
compute-to-communication ratio.

An accelerator trains a model A times faster than one CPU rank here; a link of L bit/s beside
it moves as many gradient bytes per image as a link of L / A bit/s beside the CPU rank. So
``--regime h100:10gbit`` measures this machine's img/s for the model, size and batch (one rank,
``hvd-yolo bench train``), divides it by the accelerator's img/s (:data:`ACCELERATORS`) and
sets the simulated link to ``10 Gbit/s x cpu / accelerator``.

:data:`ACCELERATORS` is the one table of accelerator figures, each with its source. A figure
holds for one model at one input size; other sizes are scaled by pixel count (compute per
image grows with the pixels for a fully convolutional network). The gradient is sent once per
step, so the ratio per image is the ratio per step when the accelerator trains the same batch
per rank as the CPU run; the figures are at batch 32, the accelerator's efficient batch, so at
a smaller batch the accelerator is slower and the emulated link is, if anything, too slow.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """Training img/s of one accelerator for one model at one input size, with its source."""

    img_s: float
    size: int
    batch: int
    source: str


H100_FILE = "benchmarks/results/gpu_check_h100.txt"
# accelerator -> model -> figure. Like for like with `hvd-yolo bench train` on the CPU: the
# H100 figures are that command's (synthetic batches, one rank, AMP) on an H100 80GB HBM3.
ACCELERATORS: dict[str, dict[str, Figure]] = {
    "h100": {
        "yolov3": Figure(254.0, 416, 32, f"measured: {H100_FILE}, row bench.yolov3.fp16 "
                                          "(hvd-yolo bench train, batch 32, 416 px, AMP)"),
        "yolov3-tiny": Figure(726.0, 416, 32, f"measured: {H100_FILE}, row "
                                              "bench.yolov3-tiny.fp16 (batch 32, 416 px, AMP)"),
    },
}
REGIME_RE = re.compile(r"^([a-z0-9]+):(\d+(?:\.\d+)?)(mbit|gbit)$")


class RegimeError(ValueError):
    """A regime that cannot be emulated: the message names it and what to use instead."""


@dataclass(frozen=True)
class Regime:
    accelerator: str
    link_bps: float

    @property
    def label(self) -> str:
        return f"{self.accelerator}:{self.link_bps / 1e9:g}gbit"


def parse(text: str) -> Regime:
    """``'h100:10gbit'`` -> Regime('h100', 1e10); unknown accelerators are refused by name."""
    m = REGIME_RE.match(text.strip().lower())
    if not m:
        raise RegimeError(f"--regime {text!r}: expected ACCELERATOR:RATE, e.g. h100:10gbit or "
                          "h100:25gbit")
    name, value, unit = m.groups()
    if name not in ACCELERATORS:
        raise RegimeError(f"--regime {text!r}: no figures for accelerator {name!r} (known: "
                          f"{', '.join(sorted(ACCELERATORS))}; hvd_yolo/regime.py ACCELERATORS)")
    bps = float(value) * (1e9 if unit == "gbit" else 1e6)
    if bps <= 0:
        raise RegimeError(f"--regime {text!r}: the link rate must be positive")
    return Regime(name, bps)


def accelerator_img_s(accelerator: str, model: str, size: int) -> float:
    """The accelerator's training img/s for ``model`` at ``size`` px (pixel-count scaled)."""
    figures = ACCELERATORS[accelerator]
    if model not in figures:
        raise RegimeError(f"no {accelerator} figure for model {model!r} (known: "
                          f"{', '.join(sorted(figures))})")
    fig = figures[model]
    return fig.img_s * (fig.size / size) ** 2


def emulated_rate_bps(regime: Regime, model: str, size: int, host_img_s: float) -> float:
    """The link rate (bit/s) that gives one CPU rank at ``host_img_s`` the regime's ratio."""
    if host_img_s <= 0:
        raise RegimeError(f"this machine's img/s must be positive, got {host_img_s}")
    return regime.link_bps * host_img_s / accelerator_img_s(regime.accelerator, model, size)


def tc_rate(bps: float) -> str:
    """A rate in tc's units, kbit resolution: 26.7e6 -> '26700kbit'."""
    return f"{max(1, round(bps / 1e3))}kbit"


def measure_host_img_s(model: str, size: int, batch: int, iterations: int = 3,
                       timeout: float = 900) -> float:
    """One rank's img/s here: ``hvd-yolo bench train`` (1 thread, no launcher), median."""
    from hvd_yolo.launch import hvd_yolo_argv

    with tempfile.TemporaryDirectory(prefix="hvd_yolo_regime_") as tmp:
        out = Path(tmp) / "bench.json"
        argv = hvd_yolo_argv("bench", "train", "--model", model, "--size", str(size),
                             "--batch-size", str(batch), "--threads", "1", "--warmup", "1",
                             "--iterations", str(iterations), "--quiet", "--json", str(out))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RegimeError(f"measuring this machine's img/s failed ({' '.join(argv)}): "
                              f"{tail[0]}")
        return float(json.loads(out.read_text())["img_per_sec_total"])


def plan_link(regime_text: str, model: str, size: int, batch: int,
              host_img_s: float | None = None) -> dict:
    """The emulated link for a regime: measured (or given) host img/s, the accelerator's,
    their ratio and the tc rate, as a record for cluster.json and benchmark JSON."""
    regime = parse(regime_text)
    accel = accelerator_img_s(regime.accelerator, model, size)
    measured = host_img_s is None
    host = measure_host_img_s(model, size, batch) if measured else float(host_img_s)
    bps = emulated_rate_bps(regime, model, size, host)
    fig = ACCELERATORS[regime.accelerator][model]
    return {"regime": regime.label, "model": model, "size": size, "batch": batch,
            "host_img_s": host, "host_img_s_measured": measured, "accelerator_img_s": accel,
            "compute_ratio": accel / host, "target_link_bps": regime.link_bps,
            "link_bps": bps, "link": tc_rate(bps), "source": fig.source}
