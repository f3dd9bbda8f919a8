"""The overfit check (issue 15): train the demo's model on 8 demo images and evaluate on the same 8.

A correct trainer must drive things PQ far above 80 on images it trains on; if it does not, something
between the data and the loss is wrong (matcher, losses, masks, post-processing, box normalisation...).
The model, the scenes and the optimiser settings are the demo's (``configs/demo.yaml``: its ``pretrain``
stage, from the same random, calibrated initialisation), but the data are 8 synthetic Cityscapes train
images with their Cityscapes labels, and validation runs on those very images, through the training
engine's own validation (``run_inference`` + ``PQEvaluator``, the ``detr-panoptic evaluate`` path), with
the collapse diagnostics (``engine.diagnostics``) added to each record.

Usage: python bench/overfit_check.py [--steps 600] [--eval-every 100] [--images 8] [--out runs/overfit]
                                     [--set train.lr=1e-4 ...] [--label NAME] [--val-images 0]
``--val-images N`` validates on N held-out images instead (the same recipe as a generalisation run: more
``--images`` and a held-out split show whether a setting keeps the encoder from collapsing).
Prints PQ (all / things / stuff), the diagnostics and seconds at each validation; writes
bench/results/overfit_check[_<label>].json. Timings are wall time on whatever the machine does besides.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.config import apply_overrides, config_from_dict
from detr_panoptic.data.coco_panoptic import cityscapes_panoptic_dataset
from detr_panoptic.demo.pipeline import (
    MemoryDataset,
    demo_config_path,
    load_demo_config,
    prepare_target_data,
    random_calibrated_init,
)
from detr_panoptic.engine import training
from detr_panoptic.engine.diagnostics import DiagnosedValidation, diagnostic_images
from detr_panoptic.engine.training import make_validator, train_stage
from detr_panoptic.evaluation.detection import DetectionAccumulator, mask_boxes

KEYS = ("pq", "pq_things", "pq_stuff", "sq", "rq")


def overfit_config(raw: dict[str, Any], *, root: Path, out: Path, steps: int, eval_every_steps: int,
                   steps_per_epoch: int, overrides: list[str]) -> Any:
    """The demo's pre-training stage, on the target data (Cityscapes classes), validated every
    ``eval_every_steps`` steps."""
    data = {k: v for k, v in raw.items() if k != "stages"}
    pretrain = next(s for s in raw["stages"] if s["name"] == "pretrain")
    data = json.loads(json.dumps(data))
    for section in ("model", "data", "train", "freeze", "logging"):
        data.setdefault(section, {}).update(pretrain.get(section, {}))
    data["name"] = "overfit"
    data["data"].update({"dataset": "cityscapes", "root": str(root)})
    data["train"].update({"output_dir": str(out), "max_steps": steps, "epochs": 100_000, "resume": False,
                          "eval_every_epochs": max(1, eval_every_steps // steps_per_epoch)})
    data["logging"].update({"progress": False, "tensorboard": False})
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source="overfit check")


@torch.no_grad()
def detection_figures(checkpoint: Path, dataset: Any, threshold: float) -> dict[str, Any]:
    """Recall / kept queries per ground truth / mask IoU of things (``evaluation.detection``) of the
    checkpoint on ``dataset`` (network-size images: boxes and masks in the network's pixels)."""
    from torchvision.ops import box_convert

    from detr_panoptic.checkpoints import load_checkpoint
    from detr_panoptic.models.postprocess import PanopticPostProcessor, PostprocessSettings, kept_queries

    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    category_map = dataset.category_map
    is_thing = torch.tensor([c.isthing for c in category_map.categories])
    accumulator = DetectionAccumulator()
    for i in range(len(dataset)):
        image, target = dataset[i]
        h, w = image.shape[-2:]
        output = model([image])
        keep = kept_queries(output.pred_logits, threshold)[0]
        result = PanopticPostProcessor(is_thing, settings=PostprocessSettings(threshold=threshold))(output)[0]
        labels = output.pred_logits[0].argmax(-1)
        chosen = (keep & is_thing[labels.clamp(max=len(is_thing) - 1)]).nonzero().squeeze(1)
        scale = torch.tensor([w, h, w, h], dtype=torch.float)
        boxes = box_convert(output.pred_boxes[0, chosen], "cxcywh", "xyxy") * scale
        segment = {s["query"]: s["id"] for s in result.segments_info}
        masks = torch.stack([result.id_map == segment[q] if q in segment else torch.zeros(h, w, dtype=torch.bool)
                             for q in chosen.tolist()]) if len(chosen) else torch.zeros(0, h, w, dtype=torch.bool)
        gt = [g for g in range(len(target["labels"])) if is_thing[target["labels"][g]] and not target["iscrowd"][g]]
        gt_masks = target["masks"][gt]
        accumulator.add(pred_categories=labels[chosen], pred_boxes=boxes, gt_categories=target["labels"][gt],
                        gt_boxes=mask_boxes(gt_masks), gt_masks=gt_masks, pred_masks=masks)
    figures = accumulator.compute()
    names = {str(i): c.name for i, c in enumerate(category_map.categories)}
    figures["per_class"] = {names[k]: v for k, v in figures["per_class"].items()}
    return figures


def stride4_ceiling(dataset: Any) -> dict[str, Any]:
    """What masks at 1/4 of the input allow at best, estimated: each ground-truth thing mask averaged over
    4x4 cells, upsampled bilinearly and cut at 0.5 (the mask head predicts at 1/4 and post-processing
    upsamples bilinearly), against the mask itself. Per class: the mean IoU, and the things PQ of a
    predictor that found every thing with exactly that mask (a match needs IoU > 0.5)."""
    import torch.nn.functional as F

    names = [c.name for c in dataset.category_map.categories]
    ious: dict[str, list[float]] = {}
    for i in range(len(dataset)):
        _, target = dataset[i]
        for mask, label, crowd in zip(target["masks"], target["labels"], target["iscrowd"]):
            if not dataset.category_map.categories[int(label)].isthing or crowd:
                continue
            low = F.avg_pool2d(mask[None, None].float(), 4, ceil_mode=True)
            up = F.interpolate(low, size=mask.shape, mode="bilinear", align_corners=False)[0, 0] > 0.5
            ious.setdefault(names[int(label)], []).append(float((up & mask).sum() / (up | mask).sum()))
    pq = {name: 100 * sum(v for v in values if v > 0.5) / len(values) for name, values in ious.items()}
    return {"mask_iou": {name: 100 * sum(v) / len(v) for name, v in ious.items()}, "pq": pq,
            "pq_things": sum(pq.values()) / len(pq) if pq else float("nan")}


def enable_query_groups_in_training(groups: int) -> None:
    """``train.query_groups`` for this script's run: ``engine.training.prepare_model`` followed by
    ``model.enable_query_groups`` (what train_stage does once the option is wired there)."""
    original = training.prepare_model

    def prepare(config: Any, *args: Any, **kwargs: Any) -> Any:
        return original(config, *args, **kwargs).enable_query_groups(groups)

    training.prepare_model = prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--val-images", type=int, default=0,
                        help="0 (the overfit check): validate on the training images; N: on N held-out val images")
    parser.add_argument("--out", default="runs/overfit")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override on the demo's pre-training stage, e.g. train.lr=1e-4")
    parser.add_argument("--label", default="", help="suffix of the result file (a variant's name)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    settings, raw = load_demo_config(demo_config_path())
    out = Path(args.out)
    root = out / f"data_{args.images}_{args.val_images}"
    settings = type(settings)(**{**settings.to_dict(), "train_images": args.images,
                                 "val_images": max(1, args.val_images),
                                 "size": tuple(settings.size)})
    prepare_target_data(root, settings, seed=0, workers=1)
    run_dir = out / ("run_" + (args.label or "default"))
    shutil.rmtree(run_dir, ignore_errors=True)

    probe = overfit_config(raw, root=root, out=run_dir, steps=args.steps, eval_every_steps=args.eval_every,
                           steps_per_epoch=1, overrides=args.overrides)
    d = probe.data
    train_set = cityscapes_panoptic_dataset(root, "train", min_size=d.min_size, max_size=d.max_size)
    category_map = train_set.category_map
    memory = MemoryDataset(train_set)
    val_set = train_set if args.val_images == 0 else cityscapes_panoptic_dataset(
        root, "val", category_map=category_map, min_size=d.min_size, max_size=d.max_size)
    val_memory = memory if args.val_images == 0 else MemoryDataset(val_set)
    steps_per_epoch = max(1, len(memory) // probe.train.batch_size)
    config = overfit_config(raw, root=root, out=run_dir, steps=args.steps, eval_every_steps=args.eval_every,
                            steps_per_epoch=steps_per_epoch, overrides=args.overrides)
    if config.model.init is None:  # random weights, as the demo's pre-training starts
        init = random_calibrated_init(out / f"init_{args.label or 'default'}.pth", config, category_map,
                                      [memory[i][0] for i in range(len(memory))],
                                      mask_attention_gain=settings.mask_attention_gain)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, init=str(init)))
    device = torch.device("cuda" if config.train.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.train.device == "auto" else config.train.device))
    validate = make_validator(val_set, category_map, min_size=d.min_size, max_size=d.max_size,
                              threshold=config.train.eval_threshold, batch_size=4, rank=0, world_size=1,
                              device=device)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    diagnosed = DiagnosedValidation(validate, diagnostic_images(val_memory))

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        before = time.perf_counter()
        metrics = diagnosed(model)
        row = {"seconds": round(before - start, 1),
               **{k: round(float(metrics[k]), 2) for k in KEYS if k in metrics},
               **{k: float(f"{metrics[k]:.3g}") for k in metrics if k.startswith("diag_")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return metrics

    if config.train.query_groups > 1:  # idempotent once train_stage wires it itself
        enable_query_groups_in_training(config.train.query_groups)
    train_stage(config, evaluate=evaluate, datasets=(memory, val_memory, category_map))
    total = time.perf_counter() - start
    detection = detection_figures(run_dir / "checkpoints" / "last.pth", val_memory, config.train.eval_threshold)
    ceiling = stride4_ceiling(val_memory)
    print("things PQ ceiling of exact masks at 1/4 resolution (estimate): {:.1f} ({})".format(
        ceiling["pq_things"], ", ".join(f"{k} {v:.0f}" for k, v in ceiling["pq"].items())))
    print("things detection on the validation images (last.pth): recall {recall:.1f}%, kept per ground truth "
          "{kept_per_gt:.2f}, kept ratio {kept_ratio:.2f}, mask IoU {mask_iou:.1f}%".format(**detection))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for row, record in zip(rows, [r for r in records if r["kind"] == "val"]):
        row["step"] = record["step"]
    print(f"{'step':>6} {'s':>7} {'PQ':>6} {'things':>7} {'stuff':>6}  memory_var  box_spread")
    for row in rows:
        print(f"{row.get('step', '?'):>6} {row['seconds']:>7} {row.get('pq', float('nan')):>6.1f} "
              f"{row.get('pq_things', float('nan')):>7.1f} {row.get('pq_stuff', float('nan')):>6.1f}  "
              f"{row.get('diag_memory_image_var', float('nan')):>10.3g}  {row.get('diag_box_centre_spread', float('nan')):.3g}")
    figures: dict[str, Any] = {}
    for row in rows:
        figures[f"step_{row.get('step', '?')}"] = (
            f"PQ {row.get('pq', float('nan')):.1f} / things {row.get('pq_things', float('nan')):.1f} / stuff "
            f"{row.get('pq_stuff', float('nan')):.1f} at {row['seconds']:.0f} s; memory image-var "
            f"{row.get('diag_memory_image_var', float('nan')):.3g}, box-centre spread "
            f"{row.get('diag_box_centre_spread', float('nan')):.3g}")
    if rows:
        figures.update({f"final_{k}": rows[-1].get(k) for k in ("pq", "pq_things", "pq_stuff")})
    figures["total_seconds"] = round(total, 1)
    figures["things_pq_ceiling_stride4"] = round(ceiling["pq_things"], 1)
    figures.update({f"things_{k}": detection[k] for k in ("recall", "kept_per_gt", "duplicates_per_gt",
                                                          "kept_ratio", "mask_iou")})
    result = {
        "name": "overfit_check" + (f"_{args.label}" if args.label else ""),
        "figures": figures,
        "rows": rows,
        "detection": detection,
        "stride4_ceiling": ceiling,
        "command": "python bench/overfit_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "overrides": args.overrides,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "threads": torch.get_num_threads(),
        "notes": f"{args.images} synthetic demo images ({settings.size}), " + (
                 "trained and evaluated on the same images; " if args.val_images == 0 else
                 f"evaluated on {args.val_images} held-out val images; ") +
                 "demo pre-training settings from random calibrated weights; seconds are wall time since the "
                 "start of training (validations included) on a machine shared with other jobs",
    }
    path = Path(__file__).parent / "results" / f"{result['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
