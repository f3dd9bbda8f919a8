"""``detr-panoptic pq`` (PQ of COCO-panoptic prediction files) and ``detr-panoptic evaluate`` (run a
model over a split, write its predictions, measure PQ)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from detr_panoptic.commands.common import add_checkpoint, add_config, add_device, add_out, add_workers

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    pq = subparsers.add_parser(
        "pq", help="panoptic quality of COCO-panoptic predictions (panopticapi-exact)",
        description="Compute PQ/SQ/RQ of predictions in COCO panoptic format (PNG folder + JSON) against "
        "ground truth in the same format, with panopticapi's rules. Prints per-class and All/Things/Stuff "
        "tables (percentages) and optionally writes them to a JSON file.")
    pq.add_argument("--gt-json", required=True, help="ground-truth COCO panoptic JSON (with categories)")
    pq.add_argument("--gt-folder", help="ground-truth PNG folder (default: the JSON path without .json)")
    pq.add_argument("--pred-json", required=True, help="predictions JSON ({'annotations': [...]})")
    pq.add_argument("--pred-folder", help="prediction PNG folder (default: the JSON path without .json)")
    add_out(pq, help="write metrics (percentages, plus panopticapi's fractions) to this JSON file")
    add_workers(pq, threads=True)
    pq.set_defaults(func=run_pq)

    evaluate = subparsers.add_parser(
        "evaluate", help="run a checkpoint over a dataset split, write COCO-panoptic predictions, measure PQ",
        description="Run the model over every image of a split (batched), write its predictions in COCO "
        "panoptic format (PNG per image + JSON), compute PQ against the split's ground truth, and write "
        "metrics.json and a per-class PQ/SQ/RQ bar chart into --out.")
    add_checkpoint(evaluate)
    add_config(evaluate, required=False)
    data = evaluate.add_argument_group("data (either Cityscapes or COCO-panoptic files)")
    data.add_argument("--cityscapes", metavar="ROOT", help="Cityscapes root (leftImg8bit/, gtFine/ with the "
                      "converted cityscapes_panoptic_<split>.json and folder)")
    data.add_argument("--split", help="Cityscapes split (default: the config's data.val_split, else val)")
    data.add_argument("--use-train-id", action="store_true",
                      help="use the _trainId variant of the converted Cityscapes panoptic files")
    data.add_argument("--gt-json", help="ground-truth COCO panoptic JSON")
    data.add_argument("--gt-folder", help="ground-truth PNG folder (default: the JSON path without .json)")
    data.add_argument("--image-dir", help="folder of the input images (COCO layout)")
    add_out(evaluate, default=None, help="output folder (default: <run>/eval for a checkpoint in "
            "<run>/checkpoints/, else ./eval)")
    evaluate.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    evaluate.add_argument("--threshold", type=float,
                          help="keep queries whose class score exceeds this (default: the config's "
                          "train.eval_threshold, else the checkpoint's calibrated threshold, else 0.85)")
    evaluate.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                          help="precision of the network (autocast; post-processing stays fp32; default: fp32)")
    evaluate.add_argument("--size", type=int, help="resize the shorter side to this before the model "
                          "(default: the config's data.min_size, else the checkpoint's training size, else 800)")
    evaluate.add_argument("--max-size", type=int, help="but keep the longer side at most this "
                          "(default: the config's data.max_size, else the checkpoint's, else 1333)")
    evaluate.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    add_device(evaluate)
    add_workers(evaluate, threads=True)
    evaluate.set_defaults(func=run_evaluate)


def run_pq(args: argparse.Namespace) -> int:
    from detr_panoptic.evaluation import format_results, load_panoptic_json, pq_compute, results_to_metrics

    gt = load_panoptic_json(args.gt_json, what="ground-truth JSON")
    results = pq_compute(gt, args.pred_json, args.gt_folder or Path(args.gt_json).with_suffix(""),
                         args.pred_folder, workers=args.workers)
    print(format_results(results, gt["categories"]))
    if args.out:
        from detr_panoptic.utils.io import atomic_write_json

        atomic_write_json(args.out, results_to_metrics(results, gt["categories"]))
        log.info("wrote %s", args.out)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from detr_panoptic.inference import EvalData, LoadOptions, evaluate_checkpoint

    data = EvalData(cityscapes_root=args.cityscapes, split=args.split, use_train_id=args.use_train_id,
                    gt_json=args.gt_json, gt_folder=args.gt_folder, image_dir=args.image_dir)
    options = LoadOptions(device=args.device, dtype=args.dtype, threshold=args.threshold, size=args.size,
                          max_size=args.max_size)
    metrics = evaluate_checkpoint(args.checkpoint, data, options, config=args.config, overrides=args.overrides,
                                  out_dir=args.out, batch_size=args.batch_size, workers=args.workers,
                                  limit=args.limit)
    _print_summary(metrics)
    return 0


def _print_summary(metrics: dict[str, Any]) -> None:
    print(metrics.get("table", ""))
    print(f"predictions: {metrics.get('predictions_json')}  metrics: {metrics.get('metrics_json')}  "
          f"chart: {metrics.get('chart')}")
