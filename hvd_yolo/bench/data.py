"""`hvd-yolo bench data`: images/s of read + decode from shards vs the same images as files.

The readers decode with the same torchvision decoder and visit the images in the same shuffled
order (``ShardSampler`` for one rank), through a DataLoader with 0 and k workers; only where
the bytes come from differs (one ``pread`` per sample from a shard, with and without its CRC32
check, vs one ``open()`` per file). Each figure is the median of ``--rounds`` rounds that
alternate the readers (A B C A B C ...). Without ``--shards`` a
synthetic YOLO dataset is written and converted first. The OS page cache is warm for both after
the warm-up pass, so this measures per-sample overhead, not cold-disk reads. Decoding dominates
read + decode, so the bytes alone are also timed (in-process, no decode): that is where the
readers differ.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", metavar="DIR", help="existing shard directory (default: "
                        "write and convert a synthetic dataset)")
    parser.add_argument("--image-root", metavar="DIR", help="folder of the original images "
                        "(default: the manifest's source image folder)")
    parser.add_argument("--images", type=int, default=256, help="synthetic images (default 256)")
    parser.add_argument("--size", type=int, default=320, help="synthetic image side (default 320)")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts (default 0,2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passes", type=int, default=2, help="timed passes (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of all readers; the median is reported")
    parser.add_argument("--limit", type=int, default=0, help="read at most this many images")
    parser.add_argument("--workdir", metavar="DIR", help="where the synthetic data goes "
                        "(default: a temporary directory, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout only)")


class FileImages:
    """The folder-of-files baseline: read each file's bytes, decode like ShardDataset does."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from hvd_yolo.shards.format import decode_rgb

        with open(self.paths[i], "rb") as f:
            return decode_rgb(f.read())


class ShardImages:
    """Read + decode only (the same work as FileImages), from shards; ``check_crc``: verify each
    sample's CRC32 as training does."""

    def __init__(self, root: str, check_crc: bool = True) -> None:
        from hvd_yolo.data.dataset import ShardDataset

        self.ds = ShardDataset(root, check_crc=check_crc)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        from hvd_yolo.shards.format import decode_rgb

        return decode_rgb(self.ds.read(i))


def _count(batch: list[Any]) -> int:
    return len(batch)


def measure(dataset: Any, order: list[int], workers: int, batch_size: int, passes: int
            ) -> dict[str, float]:
    """Images/s over ``passes`` passes of ``order`` after one warm-up pass."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                        collate_fn=_count, persistent_workers=workers > 0)
    sum(loader)  # warm-up: page cache, worker start, decoder tables
    t0 = time.perf_counter()
    n = sum(sum(loader) for _ in range(passes))
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt if dt > 0 else float("inf")}


def measure_bytes(read: Any, order: list[int], passes: int) -> dict[str, float]:
    """Images/s reading only the encoded bytes of ``order`` in this process (after a warm-up)."""
    sum(len(read(i)) for i in order)
    t0 = time.perf_counter()
    n = 0
    for _ in range(passes):
        for i in order:
            read(i)
            n += 1
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt if dt > 0 else float("inf")}


READERS = ("shards", "shards-nocrc", "files")  # shard reader with / without CRC32, loose files


def median_round(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """The round with the median images/s, listing every round's figure."""
    best = sorted(rounds, key=lambda r: r["images_per_s"])[len(rounds) // 2]
    return {**best, "rounds_images_per_s": [r["images_per_s"] for r in rounds]}


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run(args: argparse.Namespace) -> int:
    from hvd_yolo.cli import UsageError, write_json
    from hvd_yolo.data.sampler import ShardSampler
    from hvd_yolo.data.synthetic import write_yolo_dataset
    from hvd_yolo.shards.convert import convert_dataset
    from hvd_yolo.shards.format import ShardError, load_manifest

    tmp = None
    try:
        if args.shards:
            shards = Path(args.shards)
        else:
            base = Path(args.workdir) if args.workdir else Path(
                tmp := tempfile.mkdtemp(prefix="hvd_yolo_bench_data_"))
            src = write_yolo_dataset(base / "yolo", args.images, seed=args.seed,
                                     size=args.size)
            shards = base / "shards"
            convert_dataset("yolo", src, shards, shards=4, overwrite=True, progress=False)
        try:
            manifest = load_manifest(shards)
        except ShardError as e:
            raise UsageError(str(e)) from None
        image_root = Path(args.image_root or manifest["source"]["image_root"])
        shard_ds = ShardImages(str(shards))
        names = [shard_ds.ds.annotations(i)["name"] for i in range(len(shard_ds))]
        paths = [str(image_root / n) for n in names]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UsageError(f"{len(missing)} original images not found (e.g. {missing[0]}): "
                             "pass --image-root DIR")
        order = list(ShardSampler(shard_ds.ds.shard_sizes, 0, 1, seed=args.seed))
        if args.limit:
            order = order[:args.limit]
        nbytes = sum(os.path.getsize(paths[i]) for i in order)
        workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
        readers = {"shards": shard_ds, "shards-nocrc": ShardImages(str(shards), check_crc=False),
                   "files": FileImages(paths)}
        rounds = max(1, args.rounds)
        results = []
        for w in workers:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in READERS}
            for _ in range(rounds):  # A B C A B C ...: drift on a shared machine hits all alike
                for name in READERS:
                    runs[name].append(measure(readers[name], order, w, args.batch_size,
                                              args.passes))
            for name in READERS:
                r = median_round(runs[name])
                r.update(reader=name, workers=w,
                         mb_per_s=nbytes * args.passes / 2**20 / r["seconds"])
                results.append(r)
        passes = max(args.passes, 5)  # bytes are cheap: more passes for a steadier figure
        read = {"shards": shard_ds.ds.read, "shards-nocrc": readers["shards-nocrc"].ds.read,
                "files": lambda i: _read_file(paths[i])}  # what each hands the decoder
        byte_runs: dict[str, list[dict[str, float]]] = {name: [] for name in READERS}
        for _ in range(rounds):
            for name in READERS:
                byte_runs[name].append(measure_bytes(read[name], order, passes))
        bytes_only = [dict(median_round(byte_runs[name]), reader=name) for name in READERS]
        for r in bytes_only:
            r["mb_per_s"] = nbytes * passes / 2**20 / r["seconds"]
        out = {
            "benchmark": "data",
            "shards": str(shards) if args.shards else "generated",  # no temp paths in results
            "image_root": str(image_root) if args.shards else "generated",
            "images": len(order),
            "mean_image_kb": nbytes / max(len(order), 1) / 1024,
            "batch_size": args.batch_size,
            "passes": args.passes,
            "rounds": rounds,
            "results": results,
            "bytes_only": bytes_only,
            "env": _env(),
        }
        print(format_table(out))
        if args.json:
            write_json(args.json, out)
        return 0
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def format_table(out: dict[str, Any]) -> str:
    lines = [f"data loading: {out['images']} images (mean {out['mean_image_kb']:.1f} KiB), "
             f"batch {out['batch_size']}, {out['passes']} timed passes after a warm-up, median "
             f"of {out.get('rounds', 1)} alternating rounds",
             f"{'workers':>7}  {'reader':<12} {'images/s':>10} {'MiB/s':>8}  {'vs files':>8}"]
    files = {r["workers"]: r["images_per_s"] for r in out["results"] if r["reader"] == "files"}
    for r in out["results"]:
        ratio = r["images_per_s"] / files[r["workers"]] if files.get(r["workers"]) else 0
        lines.append(f"{r['workers']:>7}  {r['reader']:<12} {r['images_per_s']:>10.1f} "
                     f"{r['mb_per_s']:>8.1f}  {ratio:>7.2f}x")
    b = {r["reader"]: r["images_per_s"] for r in out.get("bytes_only", [])}
    if b.get("shards") and b.get("files"):
        nocrc = (f" ({b['shards-nocrc']:.0f} without the CRC32 check = "
                 f"{b['shards-nocrc'] / b['files']:.2f}x)" if b.get("shards-nocrc") else "")
        lines.append(f"bytes only, no decode, 0 workers: shard reader {b['shards']:.0f} img/s, "
                     f"file reader {b['files']:.0f} img/s = {b['shards'] / b['files']:.2f}x"
                     + nocrc)
    return "\n".join(lines)


def _env() -> dict[str, Any]:
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}
