"""Cost of ``calibrate`` (a 30-setting post-processing sweep) against one plain ``evaluate`` of the same split.

Goal (issue 16): the sweep costs at most 1.5x one evaluation. Both run side by side in one process on the
same generated data, alternating (``--reps`` times each; the median is reported), so a shared machine's
load hits them alike:

* evaluate: ``inference.evaluate_dataset`` at the default post-processing (threshold 0.85), as the
  ``evaluate`` command runs it (predictions PNG + JSON written, PQ by ``pq_compute`` from the files);
* calibrate: ``inference.calibrate.calibrate`` over 15 thresholds (0.25 .. 0.95) x 2 stuff merge modes (min_visible 0
  only: the figures recorded before that rule existed; the default grid adds 3 more values).

Data: a synthetic Cityscapes val split (``data.make_synthetic_cityscapes``, ``--images`` images of
``--height`` x 2 * height, converted to COCO panoptic), run at its original size. Model: DETR-R50
panoptic (19 Cityscapes classes, 100 queries) with random weights whose class head is fitted (least
squares on the decoder output of the first image) so that ``--kept`` queries predict a class with
scores spread from 0.3 to 0.99 (half things, half stuff, stuff classes repeated) and the others "no
object": a random head scores every class ~1/20 and nothing would pass any threshold.

With ``--checkpoint CKPT --cityscapes ROOT [--split val] [--threshold T] --label NAME`` it measures a
trained model on a real split instead (the demo's final model: ``--checkpoint
runs/demo/stage2/checkpoints/best.pth --cityscapes runs/demo/data/cityscapes --threshold 0.5 --label
demo``), evaluate at ``T`` (default: the checkpoint's setting), and also reports calibrated PQ against
PQ at 0.5 and 0.85.

Usage: ``python bench/bench_calibrate.py [--images 4] [--height 384] [--reps 2] [--kept 30]``
Writes bench/results/bench_calibrate[_<label>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
THRESHOLDS = tuple(round(0.25 + 0.05 * i, 2) for i in range(15))
MERGE_MODES = ("reference", "merge")


def cpu_model() -> str:
    from detr_panoptic.utils.precision import cpu_model as model_name

    return model_name()


def steer_class_head(model, category_map, image: torch.Tensor, kept: int) -> None:
    """Least-squares fit of the class head: ``kept`` queries get one class with a margin giving scores
    0.3 .. 0.99 (alternating thing / stuff, stuff classes reused), the rest "no object"."""
    is_thing = category_map.is_thing().tolist()
    things = [i for i, t in enumerate(is_thing) if t]
    stuff = [i for i, t in enumerate(is_thing) if not t]
    num_classes = len(is_thing)
    with torch.inference_mode():
        batch, mask = model._batch([image], None)
        hs = model._trunk(batch, mask)["hs"][-1][0]  # [Q, D]
    queries, dim = hs.shape
    chosen = torch.linspace(0, queries - 1, kept).round().long().tolist()
    scores = torch.linspace(0.3, 0.99, kept).tolist()
    target = torch.zeros(queries, num_classes + 1, dtype=torch.float64)
    target[:, num_classes] = 10.0
    for n, (q, p) in enumerate(zip(chosen, scores)):
        label = things[n % len(things)] if n % 2 == 0 else stuff[(n // 2) % 4]  # 4 stuff classes: repeats
        target[q, num_classes] = 0.0
        target[q, label] = float(torch.log(torch.tensor(num_classes * p / (1 - p))))  # softmax -> ~p
    features = torch.cat([hs.double(), torch.ones(queries, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(features, target, driver="gelsd").solution
    with torch.no_grad():
        model.detr.class_embed.weight.copy_(solution[:dim].T.float())
        model.detr.class_embed.bias.copy_(solution[dim].float())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=384, help="image height (width: 2x)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kept", type=int, default=30, help="queries with a class (scores 0.3 .. 0.99)")
    parser.add_argument("--checkpoint", default=None, help="a trained model instead of the steered random one")
    parser.add_argument("--cityscapes", default=None, help="with --checkpoint: the converted Cityscapes root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threshold", type=float, default=None, help="with --checkpoint: evaluate's threshold")
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    sys.path.insert(0, str(BENCH.parent / "src"))
    from detr_panoptic.data import convert_cityscapes, make_synthetic_cityscapes
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings, evaluate_dataset
    from detr_panoptic.inference.calibrate import calibrate
    from detr_panoptic.inference.samples import DatasetSamples
    from detr_panoptic.models.detr import PanopticDETR

    size = (args.height, 2 * args.height)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            predictor = PanopticPredictor.from_pretrained(args.checkpoint, device="cpu", threshold=args.threshold)
            dataset = cityscapes_panoptic_dataset(args.cityscapes, args.split,
                                                  category_map=predictor.settings.category_map)
            size = (predictor.settings.min_size, predictor.settings.max_size)
        else:
            root = Path(tmp) / "cityscapes"
            make_synthetic_cityscapes(root, train=0, val=args.images, size=size, seed=3)
            convert_cityscapes(root, splits=("val",), workers=1, progress=False)
            dataset = cityscapes_panoptic_dataset(root, "val")
            category_map = dataset.category_map
            torch.manual_seed(0)
            model = PanopticDETR(category_map.num_classes).eval()
            settings = PredictorSettings(category_map, min_size=size[0], max_size=size[1])
            first = DatasetSamples(dataset, min_size=size[0], max_size=size[1])[0]
            steer_class_head(model, category_map, first.image, args.kept)
            predictor = PanopticPredictor(model, settings, device="cpu")

        evaluate_s, calibrate_s, tables, metrics = [], [], [], []
        for rep in range(args.reps):
            start = time.perf_counter()
            out = evaluate_dataset(predictor, dataset, Path(tmp) / f"eval{rep}", progress=False, chart=False)
            evaluate_s.append(time.perf_counter() - start)
            metrics.append(out["metrics"])
            start = time.perf_counter()
            tables.append(calibrate(predictor, dataset, thresholds=THRESHOLDS, merge_modes=MERGE_MODES,
                                    min_visibles=(0.0,)))
            calibrate_s.append(time.perf_counter() - start)
            print(f"rep {rep}: evaluate {evaluate_s[-1]:.2f} s, calibrate {calibrate_s[-1]:.2f} s "
                  f"(forward {tables[-1].forward_seconds:.2f} s, {tables[-1].postprocess_runs} post-processing "
                  f"runs {tables[-1].postprocess_seconds:.2f} s)", flush=True)

    table = tables[-1]
    same = table.row(predictor.settings.threshold, "reference", 4)
    median_eval, median_cal = statistics.median(evaluate_s), statistics.median(calibrate_s)
    best = table.best
    figures = {
        "images": len(dataset), "image_size": f"{size[1]}x{size[0]}", "settings": len(table), "reps": args.reps,
        "kept_target_on_first_image": args.kept,
        "evaluate_s": round(median_eval, 3), "calibrate_s": round(median_cal, 3),
        "ratio_calibrate_vs_evaluate": round(median_cal / median_eval, 3), "goal_ratio": 1.5,
        "evaluate_s_per_rep": [round(v, 2) for v in evaluate_s], "calibrate_s_per_rep": [round(v, 2) for v in calibrate_s],
        "ratio_per_rep": [round(c / e, 2) for c, e in zip(calibrate_s, evaluate_s)],
        "calibrate_forward_s": round(table.forward_seconds, 3),
        "calibrate_postprocess_and_pq_s": round(table.postprocess_seconds, 3),
        "postprocess_runs": table.postprocess_runs, "postprocess_runs_without_sharing": len(table) * len(dataset),
        "evaluate_threshold": predictor.settings.threshold,
        "pq_at_evaluate_threshold_sweep": round(same.pq, 6), "pq_evaluate": round(metrics[-1]["pq"], 6),
        "pq_calibrated": round(table.best.pq, 3), "pq_things_calibrated": round(table.best.pq_things, 3),
        "pq_stuff_calibrated": round(table.best.pq_stuff, 3),
        "pq_at_0.5_reference": round(table.row(0.5, "reference", 4).pq, 3),
        "pq_at_0.85_reference": round(table.row(0.85, "reference", 4).pq, 3),
        "best_setting": f"{best.setting.threshold:.2f}/{best.setting.merge_stuff}/{best.setting.min_area}",
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    name = "bench_calibrate" + (f"_{args.label}" if args.label else "")
    source = (f"checkpoint {args.checkpoint} on {args.cityscapes} {args.split}" if args.checkpoint else
              "DETR-R50 random weights, class head fitted so --kept queries score 0.3..0.99; synthetic Cityscapes "
              "at its original size")
    record = {
        "name": name, "figures": figures,
        "command": "python bench/bench_calibrate.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": ("median of --reps alternating runs in one process; evaluate = evaluate_dataset at the predictor's threshold "
                  "(PNG + JSON written, pq_compute from files); calibrate = 15 thresholds 0.25..0.95 x 2 merge modes, "
                  "one forward per image with masks for the queries kept at 0.25, post-processing + in-memory PQ per "
                  f"distinct setting; {source}; the 2-core machine may be shared with other jobs "
                  "(load_average_1min), absolute times are noisy"),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
