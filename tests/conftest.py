"""Shared pytest set-up: keep each test process to one thread on a small CPU machine."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def plot_run(tmp_path_factory):
    """A small 2-rank training run with evaluations and TensorBoard (tests/fixtures/plot_run)."""
    from tests.fixtures.plot_run import train_for_plots

    return train_for_plots(tmp_path_factory.mktemp("plot_run"))
