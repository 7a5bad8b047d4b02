"""Online data: shards -> batches, every step (``dataset``: the shard reader; ``sampler``: the
rank-aware sampler; ``augment``, ``transforms``, ``multiscale``: what happens to a sample and a
batch). ``synthetic`` writes the demo's source datasets.

The offline side (source datasets -> shards, and the shard format) is ``hvd_yolo.shards``;
importing it first sets ``HDF5_USE_FILE_LOCKING`` before any module here opens a shard.
"""

import hvd_yolo.shards  # noqa: F401  (sets HDF5_USE_FILE_LOCKING before h5py opens a file)
