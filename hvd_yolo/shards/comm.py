"""The converter's communicator: mpi4py's COMM_WORLD under an MPI launcher with more than one
rank (Horovod is not needed), otherwise a trivial one-process stand-in with the same methods.
"""

from __future__ import annotations

import os
from typing import Any

from hvd_yolo.shards.sources.common import ConversionError

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE",
                  "SLURM_STEP_NUM_TASKS")


class SerialComm:
    """The subset of an mpi4py communicator the converter uses, for one process."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def scatter(self, objs: list[Any], root: int = 0) -> Any:
        return objs[0]

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def alltoall(self, objs: list[Any]) -> list[Any]:
        return list(objs)


def world_comm() -> Any:
    """mpi4py's ``COMM_WORLD`` when an MPI launcher started > 1 ranks, else ``SerialComm``."""
    sizes = [int(os.environ[v]) for v in _MPI_SIZE_VARS if os.environ.get(v, "").isdigit()]
    if not sizes or max(sizes) <= 1:
        if int(os.environ.get("HOROVOD_SIZE", "1") or 1) > 1:
            raise ConversionError("conversion runs on MPI (mpi4py), not Horovod's Gloo launcher: "
                                  "use `mpirun -np N hvd-yolo convert ...` instead of horovodrun")
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConversionError(f"launched by MPI with {max(sizes)} ranks but mpi4py cannot be "
                              f"imported ({e}): pip install mpi4py") from e
    return MPI.COMM_WORLD
