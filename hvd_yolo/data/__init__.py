"""Data: converters to HDF5 shards, the shard format, the shard Dataset and the rank-aware sampler.

``HDF5_USE_FILE_LOCKING=FALSE`` is set here, before any submodule imports h5py, because HDF5's
file locks fail or hang on many shared file systems and the shards are read-only anyway.
Public names are imported lazily so ``import hvd_yolo.data.synthetic`` stays light.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

_EXPORTS = {
    "convert_dataset": "hvd_yolo.data.convert",
    "ConversionError": "hvd_yolo.data.convert",
    "ShardDataset": "hvd_yolo.data.dataset",
    "ShardIterableDataset": "hvd_yolo.data.dataset",
    "ShardSampler": "hvd_yolo.data.sampler",
    "ShardError": "hvd_yolo.data.shards",
    "load_manifest": "hvd_yolo.data.shards",
    "verify_shards": "hvd_yolo.data.shards",
    "shard_info": "hvd_yolo.data.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hvd_yolo.data' has no attribute {name!r}")
