"""Class-head warm start vs re-initialisation, on the demo's data and budget.

The demo fine-tunes a source-domain model (COCO-style labels) on synthetic Cityscapes. Its class head
must change (other classes); it is either re-initialised (PyTorch's default, as the reference) or
*warm-started*: each Cityscapes class takes the row of the source class with the matching name
(``resources/coco_to_cityscapes_classes.json``: rider <- person, sidewalk <- pavement-merged, ...).
Everything else is the demo's stage 1 (transformer frozen, same steps, learning rate, batch, data).

Figures: PQ of the start point (head adapted, no training) and after stage 1 for both, per seed, and
the median / mean over seeds. Needs a demo run folder with ``source_model.pth`` and the data (made by
``detr-panoptic demo``; this script runs the demo's data and pre-training phases when missing).

Usage: ``python bench/bench_warm_start.py [--demo-run runs/demo] [--seeds 0 1] [--steps N]``
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work" / "warm_start"


def stage1_config(demo_run: Path, *, warm_start: bool, seed: int, steps: int | None):
    from detr_panoptic.demo import pipeline as demo

    settings, raw = demo.load_demo_config(demo.demo_config_path())
    source = {s: demo_run / "data" / "source" / f"panoptic_{s}.json" for s in ("train", "val")}
    _, finetune = demo.demo_configs(raw, out=demo_run, target_root=demo_run / "data" / "cityscapes", source=source,
                                    init=None, device="auto", seed=0, progress=False)
    stage1 = finetune.resolve_stages()[0]
    mode = "warm" if warm_start else "reinit"
    train = dataclasses.replace(stage1.train, output_dir=str(WORK / f"{mode}_seed{seed}"), seed=stage1.train.seed + seed,
                                resume=False, eval_every_epochs=1000,
                                max_steps=steps if steps is not None else stage1.train.max_steps)
    model = dataclasses.replace(stage1.model, class_warm_start=warm_start)
    return dataclasses.replace(stage1, train=train, model=model, name=f"warm_start/{mode}_seed{seed}"), settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-run", default="runs/demo", help="demo run folder (default: runs/demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: the demo's)")
    args = parser.parse_args()

    from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
    from detr_panoptic.demo import pipeline as demo
    from detr_panoptic.engine.training import build_model, make_pq_evaluator, train
    from detr_panoptic.utils.logging import setup_logging

    setup_logging()
    demo_run = Path(args.demo_run)
    if not (demo_run / "source_model.pth").is_file():
        print(f"{demo_run}/source_model.pth missing: running the demo first", file=sys.stderr)
        demo.run_demo(demo_run, progress=False)
    config, settings = stage1_config(demo_run, warm_start=True, seed=0, steps=args.steps)
    root = demo_run / "data" / "cityscapes"
    train_set = cityscapes_panoptic_dataset(root, "train", min_size=config.data.min_size, max_size=config.data.max_size)
    val_set = cityscapes_panoptic_dataset(root, "val", category_map=train_set.category_map,
                                          min_size=config.data.min_size, max_size=config.data.max_size)
    category_map = train_set.category_map
    memory_train, memory_val = demo.MemoryDataset(train_set), demo.MemoryDataset(val_set)
    evaluate = make_pq_evaluator(memory_val, category_map, threshold=config.train.eval_threshold, batch_size=4,
                                 rank=0, world_size=1, device=torch.device("cpu"))

    runs = []
    for seed in args.seeds:
        for warm in (True, False):
            cfg, _ = stage1_config(demo_run, warm_start=warm, seed=seed, steps=args.steps)
            shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
            torch.manual_seed(cfg.train.seed)
            start_pq = evaluate(build_model(cfg.model, category_map).eval())["pq"]
            began = time.perf_counter()
            result = train(cfg, datasets=(memory_train, memory_val, category_map))[0]
            seconds = time.perf_counter() - began
            records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in records if r.get("kind") == "val"][-1]
            run = {"seed": seed, "warm_start": warm, "start_pq": round(start_pq, 2), "stage1_pq": round(final["pq"], 2),
                   "stage1_pq_things": round(final["pq_things"], 2), "stage1_pq_stuff": round(final["pq_stuff"], 2),
                   "steps": result.steps, "seconds": round(seconds, 1)}
            print(json.dumps(run))
            runs.append(run)

    def pick(warm: bool, key: str) -> list[float]:
        return [r[key] for r in runs if r["warm_start"] == warm]

    figures = {"seeds": len(args.seeds), "stage1_steps": runs[0]["steps"]}
    for warm, label in ((True, "warm"), (False, "reinit")):
        for key in ("start_pq", "stage1_pq"):
            values = pick(warm, key)
            figures[f"{label}_{key}_median"] = round(statistics.median(values), 2)
            figures[f"{label}_{key}_mean"] = round(statistics.fmean(values), 2)
    figures["stage1_pq_gain_median"] = round(figures["warm_stage1_pq_median"] - figures["reinit_stage1_pq_median"], 2)
    figures["runs"] = runs
    result = {
        "name": "bench_warm_start",
        "figures": figures,
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "notes": (f"demo data ({settings.train_images} train / {settings.val_images} val synthetic Cityscapes images, "
                  f"{settings.size[0]}x{settings.size[1]}), the demo's source-domain model ({demo_run}/source_model.pth) "
                  "and its stage-1 settings (transformer and backbone frozen); only the class head's initialisation "
                  "differs. PQ (%) on the val split at the network resolution (in-memory evaluator), after the "
                  "last step; start_pq = before any training. Median and mean over seeds (training seed and "
                  "re-initialised rows)."),
    }
    out = BENCH / "results" / "bench_warm_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
