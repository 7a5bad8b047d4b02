"""Shared pytest set-up: one thread per test process on a small CPU machine, and the shard
datasets the test modules train and read on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# 13 small images in 3 shards: 13 is not divisible by ranks x batch
DEFAULT_SHARDS = {"images": 13, "seed": 5, "shards": 3, "size_range": (96, 144)}


@pytest.fixture(scope="session")
def plot_run(tmp_path_factory):
    """A small 2-rank training run with evaluations and TensorBoard (tests/fixtures/plot_run)."""
    from tests.fixtures.plot_run import train_for_plots

    return train_for_plots(tmp_path_factory.mktemp("plot_run"))


class ShardSets:
    """Synthetic shard datasets made once per session, one per spec, shared read-only by every
    module that asks for the same one (``tests.fixtures.datagen.synthetic_shards``)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory, self.made = factory, {}

    def get(self, images: int, seed: int, shards: int, **kwargs) -> Path:
        from tests.fixtures.datagen import synthetic_shards

        key = (images, seed, shards, tuple(sorted(kwargs.items())))
        if key not in self.made:
            self.made[key] = synthetic_shards(self.factory.mktemp("shards"), images, seed,
                                              shards, **kwargs)
        return self.made[key]


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory: pytest.TempPathFactory) -> ShardSets:
    return ShardSets(tmp_path_factory)


@pytest.fixture(scope="module")
def shards(request: pytest.FixtureRequest, shard_sets: ShardSets) -> Path:
    """The module's shard dataset, made from its ``SHARDS`` spec (``synthetic_shards``'s
    arguments; default :data:`DEFAULT_SHARDS`). Tests read it; one that changes data copies it."""
    return shard_sets.get(**getattr(request.module, "SHARDS", DEFAULT_SHARDS))
