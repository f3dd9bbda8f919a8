"""Which semantic map and instances to derive from DETR's one forward pass, measured on the demo's
model (the packaged start point adapted to the demo's synthetic Cityscapes, as the demo's "start"
phase evaluates it; or ``--checkpoint``): mIoU, iIoU and AP on the demo's val split for

* ``panoptic``: semantic map and instances read off the panoptic result (segment categories; thing segments);
* ``queries``: per-pixel argmax of sum_q p(class|q) x mask probability, and the top-k (query, class)
  pairs scored by class probability x mean mask probability inside the mask (Mask2Former's inference),
  from the queries kept at ``--candidate-threshold``.

PQ is the same for every option (the panoptic result does not change). Needs the demo's data:
``detr-panoptic demo`` (or ``--quick``) run into ``--demo`` first (only its data phase matters).

Usage: python bench/cityscapes_outputs.py [--demo runs/demo] [--checkpoint PATH] [--candidate-threshold 0.1] [--top-k 50]
Writes bench/results/cityscapes_outputs.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def start_model(demo: Path, category_map):
    """The model the demo's stage 1 starts from (its "start" phase)."""
    from detr_panoptic.demo.pipeline import demo_config_path, demo_configs, load_demo_config, start_point_path
    from detr_panoptic.engine.training import build_model

    settings, raw = load_demo_config(demo_config_path(False))
    init = str(start_point_path(settings.start_point))
    target_root = demo / "data" / "cityscapes"
    source = {s: demo / "data" / "source" / f"panoptic_{s}.json" for s in ("train", "val")}
    _, finetune = demo_configs(raw, out=demo, target_root=target_root, source=source, init=init, device="cpu", seed=0)
    stage = finetune.resolve_stages()[0]
    torch.manual_seed(stage.train.seed)
    return build_model(stage.model, category_map), stage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--checkpoint", help="evaluate this checkpoint instead of the demo's start model")
    parser.add_argument("--candidate-threshold", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=50)
    args = parser.parse_args()
    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.inference import PanopticPredictor, PredictorSettings, evaluate_dataset
    from detr_panoptic.models.dense_outputs import DenseOutputs

    demo = Path(args.demo)
    root = demo / "data" / "cityscapes"
    train_set = cityscapes_panoptic_dataset(root, "train")
    if args.checkpoint:
        predictor = PanopticPredictor.from_pretrained(args.checkpoint, device="cpu")
        source = args.checkpoint
    else:
        model, stage = start_model(demo, train_set.category_map)
        settings = PredictorSettings(train_set.category_map, min_size=stage.data.min_size,
                                     max_size=stage.data.max_size, threshold=stage.train.eval_threshold)
        predictor = PanopticPredictor(model, settings, device="cpu")
        source = "the demo's start point (stage 1's initial model)"
    s = predictor.settings
    val_set = cityscapes_panoptic_dataset(root, "val", category_map=train_set.category_map,
                                          min_size=s.min_size, max_size=s.max_size)
    options = {"panoptic": DenseOutputs(),
               "queries": DenseOutputs("queries", "queries", args.candidate_threshold, args.top_k),
               "semantic_panoptic_instances_queries": DenseOutputs("panoptic", "queries", args.candidate_threshold,
                                                                   args.top_k)}
    figures: dict[str, object] = {"model": source, "images": len(val_set), "threshold": s.threshold,
                                  "candidate_threshold": args.candidate_threshold, "top_k": args.top_k}
    for name, dense in options.items():
        with tempfile.TemporaryDirectory() as out:
            begin = time.perf_counter()
            metrics = evaluate_dataset(predictor.with_dense_outputs(dense), val_set, out, batch_size=2, workers=1,
                                       progress=False, chart=False)["metrics"]
            seconds = time.perf_counter() - begin
        for key in ("pq", "miou", "iiou", "category_miou", "ap", "ap50"):
            figures[f"{name}_{key}"] = None if metrics.get(key) is None else round(metrics[key], 2)
        figures[f"{name}_seconds"] = round(seconds, 1)
        print(name, {k: v for k, v in figures.items() if k.startswith(name)}, flush=True)
    record = {"name": "cityscapes_outputs", "figures": figures,
              "command": "python bench/cityscapes_outputs.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "notes": "semantic map / instances from the panoptic result vs from the queries (Mask2Former's "
                       "inference), same forward pass and panoptic result; scored by cityscapes-eval's "
                       "evaluators (equal to cityscapesScripts') on the demo's synthetic val split"}
    (REPO / "bench" / "results" / "cityscapes_outputs.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
