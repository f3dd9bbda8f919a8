"""``detr-panoptic cityscapes-eval``: score a folder of Cityscapes results (any model's) with the
benchmark's three metrics: PQ, pixel-level IoU/iIoU and instance-level AP."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from detr_panoptic.commands.common import add_out, add_workers

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cityscapes-eval", help="score Cityscapes results (panoptic, semantic, instance) against a split",
        description="Score a results folder against a Cityscapes split's ground truth (gtFine/<split>): "
        "PQ/SQ/RQ of COCO panoptic predictions (predictions.json + predictions/, or panoptic.json + panoptic/), "
        "class and category IoU/iIoU of semantic labelId PNGs (semantic/), AP and AP50 of instance masks "
        "(instance/*.txt + masks), each equal to the reference (panopticapi, cityscapesScripts' "
        "evalPixelLevelSemanticLabeling and evalInstanceLevelSemanticLabeling). The parts are looked for "
        "in RESULTS and RESULTS/cityscapes; any of them may be absent. Prints one table and writes "
        "metrics.json (percentages).")
    parser.add_argument("results", help="results folder (as written by `evaluate` or `predict --format cityscapes`, "
                        "or any model's results in the benchmark's formats)")
    parser.add_argument("--cityscapes", metavar="ROOT", required=True, help="Cityscapes root (with gtFine/)")
    parser.add_argument("--split", default="val", help="split to score against (default: val)")
    parser.add_argument("--parts", nargs="+", choices=("panoptic", "semantic", "instance"),
                        help="score only these parts (default: all present)")
    parser.add_argument("--semantic", metavar="DIR", help="semantic results folder (default: RESULTS/[cityscapes/]semantic)")
    parser.add_argument("--instance", metavar="DIR", help="instance results folder (default: RESULTS/[cityscapes/]instance)")
    parser.add_argument("--panoptic-json", metavar="FILE", help="COCO panoptic predictions JSON "
                        "(default: RESULTS/[cityscapes/]{panoptic,predictions}.json)")
    parser.add_argument("--panoptic-folder", metavar="DIR", help="its PNG folder (default: the JSON path without .json)")
    parser.add_argument("--limit", type=int, help="only the split's first N images (sorted by name)")
    add_out(parser, help="metrics file (default: RESULTS/metrics.json)")
    add_workers(parser, threads=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from detr_panoptic.evaluation.cityscapes import (
        evaluate_cityscapes_results,
        find_results,
        format_cityscapes_table,
    )
    from detr_panoptic.utils.io import atomic_write_json

    start = time.perf_counter()
    layout = find_results(args.results, semantic=args.semantic, instance=args.instance,
                          panoptic_json=args.panoptic_json, panoptic_folder=args.panoptic_folder)
    metrics = evaluate_cityscapes_results(args.results, args.cityscapes, args.split, parts=args.parts,
                                          workers=args.workers, limit=args.limit, layout=layout)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    print(format_cityscapes_table(metrics))
    out = Path(args.out) if args.out else Path(args.results) / "metrics.json"
    atomic_write_json(out, metrics)
    print(f"{metrics['num_images']} images, parts: {', '.join(metrics['parts'])}; metrics: {out}")
    return 0
