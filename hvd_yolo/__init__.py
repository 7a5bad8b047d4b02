"""hvd_yolo: data-parallel YOLOv3 training with Horovod over MPI on HDF5-sharded datasets."""

__version__ = "0.1.0"
