"""bf16 against fp32 on a trained model (issue 18): PQ of both, and how many pixels keep their segment.

Runs the same predictor in float32 and under bf16 autocast (``PanopticPredictor(dtype=...)``, what
``detr-panoptic evaluate --dtype bf16`` does) over a COCO-panoptic split, side by side in one process, and
reports PQ / things / stuff of each (in memory, ``PQEvaluator``: the numbers ``evaluate`` writes), the PQ
difference (goal: within 0.3), the share of pixels whose segment comes from the same query in both (void
included), the share of images whose segments come from the same queries with the same categories, and
the seconds of each pass.

Usage::

    python bench/bf16_accuracy.py --checkpoint runs/demo/stage2/checkpoints/best.pth \
        --cityscapes runs/demo/data/cityscapes --split val [--threshold 0.5] [--label demo]

Writes bench/results/bf16_accuracy[_<label>].json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class QueryMaps:
    """Evaluator: per image, the query whose segment covers each pixel (-1: void), and the segments."""

    name = "query_maps"

    def reset(self) -> None:
        self.maps: dict[Any, torch.Tensor] = {}
        self.segments: dict[Any, list[tuple[int, int, int]]] = {}

    def process(self, samples, results) -> None:
        for sample, result in zip(samples, results):
            lookup = torch.full((int(result.id_map.max()) + 1,), -1, dtype=torch.int16)
            for segment in result.segments_info:
                lookup[segment["id"]] = segment["query"]
            self.maps[sample.image_id] = lookup[result.id_map.cpu()]
            self.segments[sample.image_id] = [(s["query"], s["category_id"]) for s in result.segments_info]

    def evaluate(self) -> dict[str, Any]:
        return {"maps": self.maps, "segments": self.segments}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cityscapes", help="Cityscapes root (gtFine/cityscapes_panoptic_<split>.json)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--label", default="")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.evaluation import results_to_metrics
    from detr_panoptic.inference import PanopticPredictor
    from detr_panoptic.inference.evaluators import PQEvaluator
    from detr_panoptic.inference.runner import make_loader, run_inference
    from detr_panoptic.inference.samples import DatasetSamples
    from detr_panoptic.utils.precision import hardware_summary

    fp32 = PanopticPredictor.from_pretrained(args.checkpoint, device="cpu", threshold=args.threshold)
    bf16 = PanopticPredictor.from_pretrained(args.checkpoint, device="cpu", threshold=args.threshold,
                                             dtype="bf16")
    s = fp32.settings
    dataset = cityscapes_panoptic_dataset(args.cityscapes, args.split, category_map=s.category_map)
    samples = DatasetSamples(dataset, min_size=s.min_size, max_size=s.max_size)
    loader = make_loader(samples, batch_size=1, num_workers=0)
    figures: dict[str, Any] = {"images": len(samples), "threshold": s.threshold}
    outputs = {}
    for name, predictor in (("fp32", fp32), ("bf16", bf16)):
        start = time.perf_counter()
        run = run_inference(predictor, loader, [PQEvaluator(s.category_map), QueryMaps()])
        figures[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        metrics = results_to_metrics(run.outputs["pq"])
        for key in ("pq", "pq_things", "pq_stuff", "sq", "rq"):
            figures[f"{name}_{key}"] = round(float(metrics[key]), 3)
        outputs[name] = run.outputs["query_maps"]
    same_pixels = total = same_images = 0
    for image_id, fp32_map in outputs["fp32"]["maps"].items():
        bf16_map = outputs["bf16"]["maps"][image_id]
        same_pixels += int((fp32_map == bf16_map).sum())
        total += fp32_map.numel()
        same_images += outputs["fp32"]["segments"][image_id] == outputs["bf16"]["segments"][image_id]
    figures["pq_difference_bf16_minus_fp32"] = round(figures["bf16_pq"] - figures["fp32_pq"], 3)
    figures["goal_within_0.3_pq"] = abs(figures["pq_difference_bf16_minus_fp32"]) <= 0.3
    figures["same_segment_pixel_share"] = round(same_pixels / total, 6)
    # images whose segments come from the same queries with the same categories (areas may differ slightly)
    figures["same_segments_image_share"] = round(same_images / max(1, len(outputs["fp32"]["maps"])), 4)
    figures.update(hardware_summary())
    for key, value in figures.items():
        print(f"{key}: {value}")
    name = "bf16_accuracy" + (f"_{args.label}" if args.label else "")
    record = {"name": name, "figures": figures,
              "command": "python bench/bf16_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "notes": (f"checkpoint {args.checkpoint}; {len(samples)} images of {args.cityscapes} {args.split}; "
                        "the same predictor in fp32 and under bf16 autocast (post-processing in fp32), PQ in "
                        "memory (PQEvaluator); same-segment share: pixels covered by the same query's segment "
                        "(or void) in both")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
