"""YOLOv3 / YOLOv3-tiny, Darknet weights I/O, loss and post-processing."""

from hvd_yolo.config import MODEL_NAMES
from hvd_yolo.model.darknet_io import load_darknet_weights, save_darknet_weights
from hvd_yolo.model.loss import YoloLoss
from hvd_yolo.model.postprocess import postprocess
from hvd_yolo.model.yolov3 import YOLOv3, build_model

__all__ = ["MODEL_NAMES", "YOLOv3", "YoloLoss", "build_model", "load_darknet_weights",
           "postprocess", "save_darknet_weights"]
