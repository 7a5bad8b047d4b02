"""Offline data: source datasets (YOLO txt, COCO json, Pascal VOC xml) -> HDF5 shards, and the
shard format itself (``format``), which the online reader in ``hvd_yolo.data`` also uses.

``HDF5_USE_FILE_LOCKING=FALSE`` is set here, the one place, before any submodule imports h5py
(``hvd_yolo.data`` imports this package first): HDF5's file locks fail or hang on many shared
file systems, and shards are written once and then only read.
"""

import os

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
