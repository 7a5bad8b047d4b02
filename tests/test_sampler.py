"""ShardSampler: block dealing at any world size, equal lengths, determinism, epochs, resume
(on the same and on another world size), workers."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_yolo.data.sampler import ShardSampler

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
        "block_size": draw(st.integers(1, 8)),
    }


def _ranks(cfg: dict[str, Any], epoch: int, world: int | None = None) -> list[ShardSampler]:
    world = cfg["world_size"] if world is None else world
    out = []
    for r in range(world):
        s = ShardSampler(rank=r, **{**cfg, "world_size": world})
        s.set_epoch(epoch)
        out.append(s)
    return out


def _random_setup(rng: np.random.Generator) -> dict[str, Any]:
    """Shard sizes (some empty, some tiny, some large) and a world size of 1..512."""
    n_shards = int(rng.integers(1, 80))
    sizes = rng.integers(0, rng.choice([3, 40, 400]), n_shards)
    sizes[rng.random(n_shards) < 0.1] = 0
    return {"shard_sizes": sizes.tolist(), "world_size": int(rng.integers(1, 513)),
            "seed": int(rng.integers(0, 2**31)), "shuffle": bool(rng.random() < 0.8),
            "tail": str(rng.choice(["pad", "drop"])), "block_size": int(rng.integers(1, 65))}


def _check_deal(cfg: dict[str, Any], lists: list[list[int]]) -> None:
    """Equal length, disjoint, complete (pad) or at most one sample per rank left out (drop),
    and at most one sample of padding per rank: never a block, never a shard."""
    n, world = sum(cfg["shard_sizes"]), cfg["world_size"]
    length = len(lists[0])
    assert all(len(x) == length for x in lists)
    assert all(0 <= i < n for x in lists for i in x)
    owners = Counter(i for x in lists for i in set(x))
    if cfg["tail"] == "pad":
        assert length == -(-n // world)
        assert set(owners) == set(range(n))  # complete
        assert all(len(x) - len(set(x)) <= 1 for x in lists)  # padding <= 1 sample per rank
        if n >= world:
            assert max(owners.values()) == 1  # disjoint (apart from a rank's own repeat)
    else:
        assert length == n // world
        assert all(len(set(x)) == length for x in lists)  # nothing repeated
        assert max(owners.values(), default=1) == 1  # disjoint
        assert 0 <= n - len(owners) < world  # at most one sample per rank left out


def test_random_shards_and_world_sizes_up_to_512() -> None:
    rng = np.random.default_rng(20261124)
    for _ in range(150):
        cfg = _random_setup(rng)
        epoch = int(rng.integers(0, 1000))
        ranks = _ranks(cfg, epoch)
        lists = [list(s) for s in ranks]
        assert all(len(s) == len(x) for s, x in zip(ranks, lists)), cfg
        _check_deal(cfg, lists)
        r = int(rng.integers(0, cfg["world_size"]))  # deterministic: a rebuilt rank agrees
        assert list(_ranks({**cfg, "world_size": cfg["world_size"]}, epoch)[r]) == lists[r]
        if not cfg["shuffle"]:  # evaluation order: rank r reads the r-th contiguous part
            for x in lists:
                distinct = list(dict.fromkeys(x))
                assert not x or distinct == list(range(x[0], x[0] + len(distinct)))


def test_coco_72_shards_on_64_ranks_is_balanced() -> None:
    # COCO train2017 (118,287 images) in 72 balanced shards on 64 ranks: whole-shard dealing
    # gave ranks 3285 or 1643 samples (pad doubled most of the data, drop lost half of it).
    n, shards, world = 118_287, 72, 64
    sizes = [n // shards + (s < n % shards) for s in range(shards)]
    for tail, length in (("pad", 1849), ("drop", 1848)):
        cfg = {"shard_sizes": sizes, "world_size": world, "seed": 0, "shuffle": True,
               "tail": tail, "block_size": 32}
        lists = [s.epoch_indices() for s in _ranks(cfg, 3)]
        assert {len(x) for x in lists} == {length}
        _check_deal(cfg, [x.tolist() for x in lists])
        # blocks: a rank reads ~58 runs of 32 neighbouring samples, not 1849 scattered ones
        runs = [1 + int(np.count_nonzero(np.diff(np.sort(np.unique(x))) != 1)) for x in lists]
        assert max(runs) <= length // 32 + 4, max(runs)


def test_blocks_are_contiguous_runs_of_one_shard() -> None:
    s = ShardSampler([64, 64, 64, 64], rank=1, world_size=2, seed=4, block_size=16)
    idx = np.sort(s.epoch_indices())
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
    assert sum(len(r) for r in runs) == 128
    assert all(len(r) % 16 == 0 for r in runs)  # whole blocks (the parts split evenly here)
    # a small dataset uses smaller blocks (here 20 // (2 ranks x 4) = 2), so each rank's
    # share is several blocks, not one run of 10
    small = np.sort(ShardSampler([10, 10], rank=0, world_size=2, seed=4).epoch_indices())
    assert len(small) == 10 and np.count_nonzero(np.diff(small) != 1) >= 2, small


def test_fewer_shards_or_samples_than_ranks() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: blocks deal any shard count
        lists = [list(ShardSampler([5, 0, 6], rank=r, world_size=4, seed=3)) for r in range(4)]
    assert [len(x) for x in lists] == [3, 3, 3, 3]
    assert set().union(*lists) == set(range(11))
    drop = [list(ShardSampler([5, 0, 6], r, 4, seed=3, tail="drop")) for r in range(4)]
    assert [len(x) for x in drop] == [2, 2, 2, 2] and len(set().union(*drop)) == 8
    tiny = [list(ShardSampler([2, 1], r, 5, seed=1)) for r in range(5)]  # 3 samples, 5 ranks
    assert [len(x) for x in tiny] == [1] * 5 and set().union(*tiny) == {0, 1, 2}
    assert [list(ShardSampler([2, 1], r, 5, tail="drop")) for r in range(5)] == [[]] * 5
    assert list(ShardSampler([0, 0], 0, 2)) == []


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
    assert resumed.fraction_done() == pytest.approx(k1 / len(full) if full else 0.0)
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


def _loaded(cfg: dict[str, Any], state: dict[str, Any] | None, world: int, epoch: int,
            rank: int) -> ShardSampler:
    s = ShardSampler(rank=rank, **{**cfg, "world_size": world})
    if state is not None:
        s.load_state_dict(state)  # rank 0's state on every rank, as training saves it
    s.set_epoch(epoch)
    return s


def test_resume_on_other_world_sizes_reads_the_rest_of_the_epoch() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        cfg = _random_setup(rng)
        n, epoch = sum(cfg["shard_sizes"]), int(rng.integers(0, 50))
        worlds = [int(rng.integers(1, 65))]
        while len(worlds) < 3:  # W1 -> W2 -> W3 within one epoch
            worlds += [w for w in [int(rng.integers(1, 65))] if w != worlds[-1]]
        read: list[int] = []
        state = None
        for leg, world in enumerate(worlds):
            ranks = [_loaded(cfg, state, world, epoch, r) for r in range(world)]
            lists = [list(s) for s in ranks]
            length = len(lists[0])
            assert all(len(x) == length == len(s) for s, x in zip(ranks, lists)), cfg
            assert not set(read) & {i for x in lists for i in x}  # nothing read twice
            left = ranks[0].unread(epoch, ranks[0]._legs)
            assert set(left) == set(range(n)) - set(read) or cfg["tail"] == "drop"
            if cfg["tail"] == "pad":
                assert length == -(-len(left) // world)
                assert all(len(x) - len(set(x)) <= 1 for x in lists)  # padding <= 1 per rank
            else:
                assert length == len(left) // world
                assert max(Counter(i for x in lists for i in x).values(), default=1) == 1
            offset = length if leg == len(worlds) - 1 else int(rng.integers(0, length + 1))
            read += [i for x in lists for i in x[:offset]]
            state = ranks[0].state_dict(offset)
        if cfg["tail"] == "pad":
            assert set(read) == set(range(n)), cfg  # complete over the chain of world sizes
        else:  # at most one sample per rank of each world left out
            assert n - len(set(read)) <= sum(w - 1 for w in worlds)
            assert len(read) == len(set(read))


def test_pad_to_whole_steps_reads_every_sample_and_counts_its_repeats() -> None:
    """``pad_to=m`` (elastic runs: m = one step's samples): over a chain of world sizes within
    one epoch, each read to a whole number of steps, every sample is read, and the reads beyond
    once are exactly the repeats ``padded(offset)`` counts in each deal. The chain starts from
    a ``pad_to=1`` state (a checkpoint of an ordinary run)."""
    rng = np.random.default_rng(5)
    for _ in range(40):
        cfg = {**_random_setup(rng), "tail": "pad"}
        n, epoch, m = sum(cfg["shard_sizes"]), int(rng.integers(0, 50)), int(rng.integers(1, 9))
        plain = ShardSampler(rank=0, **{**cfg, "world_size": 3})
        plain.set_epoch(epoch)
        first = int(rng.integers(0, len(plain) + 1))
        read = Counter(i for r in range(3) for i in _loaded(cfg, None, 3, epoch, r).epoch_indices()[:first])
        state, padded = plain.state_dict(first), plain.padded(first)
        worlds = [int(rng.integers(1, 65)) for _ in range(3)]
        for leg, world in enumerate(worlds):
            ranks = [ShardSampler(rank=r, **{**cfg, "world_size": world}, pad_to=m) for r in range(world)]
            for s in ranks:
                s.load_state_dict(state)
            lists = [list(s) for s in ranks]
            assert all(len(x) == len(lists[0]) for x in lists) and len(lists[0]) % m == 0, cfg
            last = leg == len(worlds) - 1
            offset = len(lists[0]) if last else m * int(rng.integers(0, len(lists[0]) // m + 1))
            read.update(i for x in lists for i in x[:offset])
            done = ranks[0].state_dict()["offset"]  # of this deal, before this leg's reads
            padded += ranks[0].padded(done + offset) - ranks[0].padded(done)
            assert ranks[0].padded() < world * m + world, cfg  # < one step and a sample per rank
            if last:
                assert set(read) == set(range(n)), cfg  # none lost
                assert sum(read.values()) - n == padded, cfg  # read twice: the counted padding
            state = ranks[0].state_dict(offset)


def test_unread_is_what_the_old_world_has_not_read() -> None:
    cfg = {"shard_sizes": [40, 7, 0, 33], "world_size": 3, "seed": 9, "shuffle": True,
           "tail": "pad", "block_size": 8}
    lists = [list(s) for s in _ranks(cfg, 2)]  # 80 samples: 27 per rank, 1 padded
    read = {i for x in lists for i in x[:10]}
    s = ShardSampler(rank=0, **{**cfg, "world_size": 5})
    assert s.unread(2, [(3, 10)]).tolist() == sorted(set(range(80)) - read)
    assert s.unread(2, []).tolist() == list(range(80))
    with pytest.raises(ValueError, match="offset 28 is outside the 27 samples per rank"):
        s.unread(2, [(3, 28)])
    # re-dealt on 5 ranks: 50 unread samples, 10 per rank, half the epoch done
    s.load_state_dict(ShardSampler(rank=0, **cfg).state_dict(0) | {"epoch": 2, "offset": 10})
    assert len(s) == 10 and s.fraction_done() == pytest.approx(30 / 80)
    assert s.fraction_done(10) == pytest.approx(1.0)
    # a checkpoint at the next epoch's start (state rewritten to epoch + 1) deals afresh
    nxt = s.state_dict(4) | {"epoch": 3, "offset": 0}
    t = ShardSampler(rank=0, **{**cfg, "world_size": 5})
    t.load_state_dict(nxt)
    t.set_epoch(3)
    assert len(t) == 16 and list(t) == list(_ranks({**cfg, "world_size": 5}, 3)[0])


def test_no_shuffle_is_contiguous_for_evaluation() -> None:
    s0 = ShardSampler([4, 4, 4, 4], rank=0, world_size=2, shuffle=False)
    s1 = ShardSampler([4, 4, 4, 4], rank=1, world_size=2, shuffle=False)
    assert list(s0) == list(range(8)) and list(s1) == list(range(8, 16))
    pad = [list(ShardSampler([6, 2, 3], r, 2, shuffle=False)) for r in range(2)]
    assert pad == [[0, 1, 2, 3, 4, 0], [5, 6, 7, 8, 9, 10]]


def test_bad_arguments_and_mismatched_state() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in range for world size 2"):
        ShardSampler([3], rank=2, world_size=2)
    with pytest.raises(ValueError, match="tail must be one of"):
        ShardSampler([3], 0, 1, tail="wrap")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ShardSampler([3], 0, 1, block_size=0)
    s = ShardSampler([10, 10], 0, 2, seed=1)
    state = s.state_dict(3)
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        ShardSampler([10, 10], 0, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="block_size=32 but this sampler has 8"):
        ShardSampler([10, 10], 0, 2, seed=1, block_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed must be in 0..10"):
        s.state_dict(11)
    t = ShardSampler([10, 10], 0, 2, seed=1)
    with pytest.raises(ValueError, match="offset 11 exceeds the epoch length 10"):
        t.load_state_dict(state | {"offset": 11})
    assert len(t) == 10 and t.epoch == 0  # a refused state leaves the sampler as it was
    with pytest.raises(ValueError, match="offset 11 is outside the 10 samples per rank"):
        ShardSampler([10, 10], 0, 4, seed=1).load_state_dict(state | {"offset": 11})
    old = {k: v for k, v in state.items() if k not in ("block_size", "legs", "legs_epoch")}
    with pytest.warns(RuntimeWarning, match="sampler state from whole-shard dealing"):
        ShardSampler([10, 10], 0, 2, seed=1).load_state_dict(old)
