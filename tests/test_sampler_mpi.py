"""Two real ranks (mpirun + Horovod): sampler + DataLoader workers give equal step counts,
also for an epoch resumed from a 3-rank state."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvd_yolo.data.synthetic import write_yolo_dataset
from hvd_yolo.shards.convert import convert_dataset
from tests.mpi_harness import run_python

REPO = Path(__file__).resolve().parents[1]

RANK_CODE = """
import torch
from torch.utils.data import DataLoader
from hvd_yolo.comm import horovod as dist
from hvd_yolo.data.dataset import ShardDataset
from hvd_yolo.data.sampler import ShardSampler

ctx = dist.init(threads=1)
ds = ShardDataset({root!r})
print(f"sizes={{ds.shard_sizes}}", flush=True)
for tail in ("pad", "drop"):
    for mode in ("map",):
        sampler = ShardSampler(ds.shard_sizes, ctx.rank, ctx.size, seed=7, tail=tail)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=list)
            steps, ids = 0, []
            for batch in loader:
                # one collective per step, as in training: unequal step counts would hang here
                dist.allreduce_sum(1.0, name=f"step.{{tail}}.{{mode}}.{{epoch}}")
                steps += 1
                ids += [s["image_id"] for s in batch]
            total = int(dist.allreduce_sum(steps, name=f"steps.{{tail}}.{{mode}}.{{epoch}}"))
            everyone = dist.allgather_object(sorted(ids), name=f"ids.{{tail}}.{{mode}}.{{epoch}}")
            key = f"{{tail}}_{{mode}}_{{epoch}}"
            print(f"steps_{{key}}={{steps}}", flush=True)
            print(f"total_{{key}}={{total}}", flush=True)
            print(f"seen_{{key}}={{len(set().union(*map(set, everyone)))}}", flush=True)
            print(f"samples_{{key}}={{len(ids)}}", flush=True)
# A 3-rank run stopped after 2 samples per rank of epoch 2, resumed here on 2 ranks: the
# epoch's unread samples are re-dealt over these ranks, read through 2 workers.
old = [ShardSampler(ds.shard_sizes, r, 3, seed=7) for r in range(3)]
for s in old:
    s.set_epoch(2)
read = sorted(i for s in old for i in list(s)[:2])
sampler = ShardSampler(ds.shard_sizes, ctx.rank, ctx.size, seed=7)
sampler.load_state_dict(old[0].state_dict(2))
sampler.set_epoch(2)
loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=list)
ids, steps = [], 0
for batch in loader:
    dist.allreduce_sum(1.0, name="step.redeal")  # unequal step counts would hang here
    steps += 1
    ids += [s["image_id"] for s in batch]
everyone = dist.allgather_object(ids, name="ids.redeal")
read_ids = {{ds.annotations(i)["image_id"] for i in read}}
print(f"redeal_steps={{steps}}", flush=True)
print(f"redeal_samples={{len(ids)}}", flush=True)
print(f"redeal_overlap={{len(read_ids & set().union(*map(set, everyone)))}}", flush=True)
print(f"redeal_seen={{len(read_ids | set().union(*map(set, everyone)))}}", flush=True)
print("done=1", flush=True)
"""


@pytest.mark.mpi
def test_two_ranks_equal_steps_with_workers(tmp_path: Path) -> None:
    src = write_yolo_dataset(tmp_path / "yolo", 11, seed=31, size=(32, 32))
    convert_dataset("yolo", src, tmp_path / "shards", shards=3)  # 3 + 4 + 4 samples
    res = run_python(RANK_CODE.format(root=str(tmp_path / "shards")), np=2, timeout=300,
                     cwd=REPO)
    assert res.values("done") == {0: "1", 1: "1"}
    assert res.values("sizes") == {0: "[3, 4, 4]", 1: "[3, 4, 4]"}
    for tail, per_rank in (("pad", 6), ("drop", 5)):  # 11 samples dealt in blocks: 6 + 5
        for mode in ("map",):
            for epoch in (0, 1):
                key = f"{tail}_{mode}_{epoch}"
                steps = res.values(f"steps_{key}")
                assert steps[0] == steps[1], (key, steps)  # equal step counts on both ranks
                assert res.values(f"total_{key}") == {0: str(2 * int(steps[0]))} | {
                    1: str(2 * int(steps[0]))}
                assert res.values(f"samples_{key}") == {0: str(per_rank), 1: str(per_rank)}
                if tail == "pad":
                    assert res.values(f"seen_{key}")[0] == "11", key  # every image seen
                else:
                    assert res.values(f"seen_{key}")[0] == "10", key  # one left out, not a shard
    # resumed from 3 ranks: 11 - 3 x 2 = 5 unread samples, 3 per rank (one padded), 2 steps
    assert res.values("redeal_steps") == {0: "2", 1: "2"}
    assert res.values("redeal_samples") == {0: "3", 1: "3"}
    assert res.values("redeal_overlap")[0] == "0"  # nothing read twice
    assert res.values("redeal_seen")[0] == "11"  # the epoch reads every image
