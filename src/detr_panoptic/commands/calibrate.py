"""``detr-panoptic calibrate``: choose the post-processing that maximises PQ on a validation split and store it
in the checkpoint (``inference.calibrate``)."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from detr_panoptic.commands.common import add_checkpoint, add_device, add_out

log = logging.getLogger(__name__)


def _listed(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        return values
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="choose the post-processing (threshold, stuff merge, min area, min visible) that maximises PQ",
        description="Sweep the post-processing settings (keep threshold x stuff merge mode x minimum segment "
        "area x minimum visible fraction of a thing's mask) on a validation split, running the network once per image; write OUT/calibration.json (the "
        "table), OUT/calibration.png (PQ against threshold) and a copy of the checkpoint with the best setting "
        "in its metadata (OUT/calibrated.pth, or the checkpoint itself with --in-place). predict, evaluate "
        "and attention then use that setting by default (an explicit --threshold still wins).")
    add_checkpoint(parser)
    data = parser.add_argument_group("data (either Cityscapes or COCO-panoptic files)")
    data.add_argument("--cityscapes", metavar="ROOT", help="Cityscapes root (with the converted panoptic files)")
    data.add_argument("--split", help="Cityscapes split (default: val)")
    data.add_argument("--use-train-id", action="store_true",
                      help="use the _trainId variant of the converted Cityscapes panoptic files")
    data.add_argument("--gt-json", help="ground-truth COCO panoptic JSON")
    data.add_argument("--gt-folder", help="ground-truth PNG folder (default: the JSON path without .json)")
    data.add_argument("--image-dir", help="folder of the input images (COCO layout)")
    add_out(parser, required=True, help="output folder (calibration.json, calibration.png, calibrated.pth)")
    parser.add_argument("--in-place", action="store_true",
                        help="store the chosen setting in CHECKPOINT itself (atomically) instead of a copy")
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--thresholds", type=_listed(float), default=None,
                      help="keep thresholds, comma-separated (default: 0.3,0.35,...,0.95)")
    grid.add_argument("--merge-modes", type=_listed(str), default=None,
                      help="stuff merge modes (default: reference,merge)")
    grid.add_argument("--min-areas", type=_listed(int), default=None,
                      help="minimum segment areas in pixels (default: 4)")
    grid.add_argument("--min-visibles", type=_listed(float), default=None,
                      help="minimum visible fractions: a thing query winning less of its own mask is dropped, its "
                      "pixels going to the others (0: the reference; default: 0,0.25,0.5,0.75)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    parser.add_argument("--size", type=int, help="resize the shorter side to this (default: the checkpoint's "
                        "training size, else 800)")
    parser.add_argument("--max-size", type=int, help="but keep the longer side at most this")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="precision of the network (autocast; post-processing stays fp32; default: fp32)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    add_device(parser)
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from detr_panoptic.inference.calibrate import (
        DEFAULT_MERGE_MODES,
        DEFAULT_MIN_AREAS,
        DEFAULT_MIN_VISIBLES,
        DEFAULT_THRESHOLDS,
        calibrate_checkpoint,
    )
    from detr_panoptic.inference.tasks import EvalData

    data = EvalData(cityscapes_root=args.cityscapes, split=args.split, use_train_id=args.use_train_id,
                    gt_json=args.gt_json, gt_folder=args.gt_folder, image_dir=args.image_dir)
    out = calibrate_checkpoint(
        args.checkpoint, args.out, data, in_place=args.in_place, thresholds=args.thresholds or DEFAULT_THRESHOLDS,
        merge_modes=args.merge_modes or DEFAULT_MERGE_MODES, min_areas=args.min_areas or DEFAULT_MIN_AREAS,
        min_visibles=args.min_visibles or DEFAULT_MIN_VISIBLES,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, size=args.size, max_size=args.max_size,
        limit=args.limit)
    table = out["table"]
    best = table.best
    print(table.format())
    print(f"chosen: {best.setting} (PQ {best.pq:.2f}, things {best.pq_things:.2f}, stuff {best.pq_stuff:.2f}) "
          f"over {table.num_images} image(s), {len(table)} settings in {table.seconds:.1f} s")
    print(f"table: {out['json']}  chart: {out['chart']}  checkpoint: {out['checkpoint']}")
    return 0
