"""`hvd-yolo convert FORMAT SOURCE OUT`: YOLO txt / COCO json / Pascal VOC xml -> HDF5 shards.

Runs in one process, or in parallel with ``mpirun -np N hvd-yolo convert ...`` (mpi4py; each
rank writes its own shards, rank 0 the manifest). The output is the same for any ``N``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hvd_yolo.cli import RunError, UsageError
from hvd_yolo.shards.comm import world_comm
from hvd_yolo.shards.convert import FORMATS, LABEL_FRAMES, ConversionError, convert_dataset
from hvd_yolo.shards.items import REENCODE
from hvd_yolo.shards.report import format_report

EPILOG = """examples:
  hvd-yolo convert yolo data/coco128 shards/coco128 --shards 8
  hvd-yolo convert coco data/coco --annotations data/coco/annotations/instances_val2017.json \\
      --images data/coco/val2017 shards/val2017 --shard-size 256
  hvd-yolo convert voc VOCdevkit/VOC2007 shards/voc07-trainval --split trainval
  mpirun -np 4 hvd-yolo convert voc my_labelimg_folder shards/mine --shards 16
  hvd-yolo convert yolo aerial_tiles shards/aerial --reencode png   # .tif tiles stored as PNG
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("format", choices=FORMATS, help="source annotation format")
    parser.add_argument("source", help="yolo: folder with images/ and labels/ | coco: folder or "
                        "instances_*.json | voc: VOCdevkit/VOC20xx or a folder of .xml + images")
    parser.add_argument("out", help="output shard directory (must be empty, or --overwrite)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shards", type=int, metavar="N", help="number of shards")
    size.add_argument("--shard-size", type=float, metavar="MB",
                      help="target shard size in MB of encoded images (default 256)")
    parser.add_argument("--names", metavar="FILE",
                        help="class names: YOLO data.yaml or a text file, one name per line "
                        "(yolo: default data.yaml/classes.txt in SOURCE; voc: default = all "
                        "names found, sorted)")
    parser.add_argument("--annotations", metavar="JSON", help="coco: the instances_*.json file")
    parser.add_argument("--images", metavar="DIR", help="coco/voc: the image folder")
    parser.add_argument("--split", metavar="NAME",
                        help="voc: only the ids in ImageSets/Main/NAME.txt")
    parser.add_argument("--allow-missing-labels", action="store_true",
                        help="yolo: an image without a label file has no objects (default: "
                        "skipped and reported)")
    parser.add_argument("--label-frame", choices=LABEL_FRAMES, default="auto",
                        help="boxes of EXIF-rotated images refer to the stored pixels (raw) or "
                        "the rotated image (display); auto: yolo display, voc/coco raw unless "
                        "the declared size is the rotated one")
    parser.add_argument("--reencode", choices=REENCODE, default=None,
                        help="store images that are not JPEG/PNG (TIFF, BMP, WEBP...) re-encoded "
                        "losslessly as PNG, listed in the report (default: skipped, with the "
                        "reason)")
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="coco: read images whose file_name is an absolute path (default: "
                        "skipped and reported, like any file_name outside --images)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards and manifest in a non-empty OUT")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad item or box (default: skip and report)")
    parser.add_argument("--max-issues", type=int, default=20, metavar="K",
                        help="issues printed at the end (all are in manifest.json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    rank = 0
    try:
        comm = world_comm()
        rank = comm.Get_rank()
        if not Path(args.source).exists():  # every rank checks; rank 0 says it
            raise UsageError(f"{args.source}: no such file or directory", show=rank == 0)
        report = convert_dataset(
            args.format, args.source, args.out, shards=args.shards, shard_size_mb=args.shard_size,
            overwrite=args.overwrite, strict=args.strict, names=args.names,
            annotations=args.annotations, images=args.images, split=args.split,
            allow_missing_labels=args.allow_missing_labels, label_frame=args.label_frame,
            reencode=args.reencode, allow_absolute_paths=args.allow_absolute_paths, comm=comm,
            progress=not args.quiet,  # a line per interval in logs
            command=["hvd-yolo", *sys.argv[1:]],
        )
    except ConversionError as e:  # raised on every rank; rank 0 says it
        raise RunError(str(e), show=rank == 0) from None
    if rank == 0:
        print(format_report(report, max_lines=args.max_issues))
        from hvd_yolo.progress import wrote_line

        print(wrote_line(args.out, ("manifest.json",)) + f" and {report['num_shards']} shard(s)")
    return 0
