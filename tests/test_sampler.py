"""ShardSampler properties (hypothesis): equal lengths, coverage, determinism, epochs, resume."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_yolo.data import sampler as sampler_module
from hvd_yolo.data.sampler import ShardSampler

pytestmark = pytest.mark.filterwarnings("ignore:ShardSampler:RuntimeWarning")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    n_shards = draw(st.integers(1, 10))
    return {
        "shard_sizes": draw(st.lists(st.integers(0, 40), min_size=n_shards, max_size=n_shards)),
        "world_size": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "shuffle": draw(st.booleans()),
        "tail": draw(st.sampled_from(["pad", "drop"])),
    }


def _ranks(cfg: dict[str, Any], epoch: int) -> list[ShardSampler]:
    out = []
    for r in range(cfg["world_size"]):
        s = ShardSampler(rank=r, **cfg)
        s.set_epoch(epoch)
        out.append(s)
    return out


@SETTINGS
@given(cfg=setups(), epoch=st.integers(0, 10_000))
def test_equal_lengths_coverage_and_determinism(cfg: dict[str, Any], epoch: int) -> None:
    ranks = _ranks(cfg, epoch)
    lists = [list(s) for s in ranks]
    n = sum(cfg["shard_sizes"])
    # every rank yields the same number of samples, and len() says so
    assert len({len(x) for x in lists}) == 1
    assert all(len(s) == len(x) for s, x in zip(ranks, lists))
    assert all(0 <= i < n for x in lists for i in x)
    counts = Counter(i for x in lists for i in x)
    if cfg["tail"] == "pad":
        assert set(counts) == set(range(n))  # nothing lost
    else:
        assert all(c == 1 for c in counts.values())  # nothing repeated
        assert len(counts) == cfg["world_size"] * len(lists[0])
        if ranks[0].striding:
            assert n - len(counts) < cfg["world_size"]  # only the tail of the permutation
    # a second construction gives the same thing
    assert [list(s) for s in _ranks(cfg, epoch)] == lists
    if not ranks[0].striding:
        # whole shards per rank, balanced within one shard's size (largest-first dealing)
        dealt = ranks[0].assignment()
        assert sorted(s for d in dealt for s in d) == [
            s for s, k in enumerate(cfg["shard_sizes"]) if k > 0]
        loads = [sum(cfg["shard_sizes"][s] for s in d) for d in dealt]
        assert max(loads) - min(loads) <= max(cfg["shard_sizes"])
        starts = [sum(cfg["shard_sizes"][:s]) for s in range(len(cfg["shard_sizes"]) + 1)]
        for r, x in enumerate(lists):
            own = {i for s in dealt[r] for i in range(starts[s], starts[s + 1])}
            assert set(x) <= own
            if cfg["tail"] == "pad":
                assert set(x) == own


@SETTINGS
@given(cfg=setups(), epoch=st.integers(0, 10_000))
def test_order_changes_across_epochs(cfg: dict[str, Any], epoch: int) -> None:
    a = [list(s) for s in _ranks(cfg, epoch)]
    b = [list(s) for s in _ranks(cfg, epoch + 1)]
    if not cfg["shuffle"]:
        assert a == b
    elif max(len(set(x)) for x in a) >= 10:  # a rank with >= 10 distinct samples: P(same) < 3e-7
        assert a != b


@SETTINGS
@given(cfg=setups(), epoch=st.integers(0, 100), data=st.data())
def test_exact_resume_mid_epoch(cfg: dict[str, Any], epoch: int, data: Any) -> None:
    rank = data.draw(st.integers(0, cfg["world_size"] - 1))
    s = ShardSampler(rank=rank, **cfg)
    s.set_epoch(epoch)
    full = list(s)
    k1 = data.draw(st.integers(0, len(full)))
    state = s.state_dict(k1)
    resumed = ShardSampler(rank=rank, **cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # the loaded epoch: keeps the offset
    assert len(resumed) == len(full) - k1
    assert list(resumed) == full[k1:]
    # resume again from the resumed run (consumed counts from where it restarted)
    k2 = data.draw(st.integers(0, len(resumed)))
    again = ShardSampler(rank=rank, **cfg)
    again.load_state_dict(resumed.state_dict(k2))
    assert list(again) == full[k1 + k2:]
    # any other epoch starts from its beginning
    again.set_epoch(epoch + 1)
    nxt = ShardSampler(rank=rank, **cfg)
    nxt.set_epoch(epoch + 1)
    assert list(again) == list(nxt)


@SETTINGS
@given(cfg=setups(), epoch=st.integers(0, 100), workers=st.integers(1, 6), data=st.data())
def test_worker_indices_partition_the_rank(cfg: dict[str, Any], epoch: int, workers: int,
                                           data: Any) -> None:
    rank = data.draw(st.integers(0, cfg["world_size"] - 1))
    s = ShardSampler(rank=rank, **cfg)
    s.set_epoch(epoch)
    k = data.draw(st.integers(0, len(s)))
    s.load_state_dict(s.state_dict(k))
    expected = list(s)
    parts = [s.worker_indices(w, workers).tolist() for w in range(workers)]
    assert sum(len(p) for p in parts) == len(expected)
    # round-robin over the workers (what a DataLoader does) gives back the sampler's order
    merged = [parts[i % workers][i // workers] for i in range(len(expected))]
    assert merged == expected


def test_striding_fallback_warns_once(monkeypatch: Any) -> None:
    monkeypatch.setattr(sampler_module, "_warned", set())
    with pytest.warns(RuntimeWarning, match="2 non-empty shards for 4 ranks: falling back"):
        s = ShardSampler([5, 0, 6], rank=1, world_size=4)
    assert s.striding and s.assignment() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardSampler([5, 0, 6], rank=2, world_size=4)  # no second warning
    lists = [list(ShardSampler([5, 0, 6], rank=r, world_size=4, seed=3)) for r in range(4)]
    assert [len(x) for x in lists] == [3, 3, 3, 3]
    assert set().union(*lists) == set(range(11))
    drop = [list(ShardSampler([5, 0, 6], r, 4, seed=3, tail="drop")) for r in range(4)]
    assert [len(x) for x in drop] == [2, 2, 2, 2] and len(set().union(*drop)) == 8


def test_shard_mode_example_and_no_shuffle() -> None:
    s0 = ShardSampler([4, 4, 4, 4], rank=0, world_size=2, shuffle=False)
    s1 = ShardSampler([4, 4, 4, 4], rank=1, world_size=2, shuffle=False)
    assert s0.assignment() == [[0, 2], [1, 3]]
    assert list(s0) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert list(s1) == [4, 5, 6, 7, 12, 13, 14, 15]
    pad = [list(ShardSampler([6, 2, 3], r, 2, seed=1)) for r in range(2)]
    assert [len(x) for x in pad] == [6, 6]
    assert sorted(set(pad[0]) | set(pad[1])) == list(range(11))


def test_bad_arguments_and_mismatched_state() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in range for world size 2"):
        ShardSampler([3], rank=2, world_size=2)
    with pytest.raises(ValueError, match="tail must be one of"):
        ShardSampler([3], 0, 1, tail="wrap")
    s = ShardSampler([10, 10], 0, 2, seed=1)
    state = s.state_dict(3)
    with pytest.raises(ValueError, match="world_size=2 but this sampler has 4"):
        ShardSampler([10, 10, 1, 1], 0, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        ShardSampler([10, 10], 0, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed must be in 0..10"):
        s.state_dict(11)
