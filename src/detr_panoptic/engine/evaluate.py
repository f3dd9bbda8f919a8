"""Evaluate a model on a COCO-panoptic split: predict every image, write the predictions in COCO
panoptic format, compute PQ (``evaluation.pq_compute``, panopticapi-exact) at full resolution.

``evaluate_model(model, dataset, out_dir)`` writes into ``out_dir``::

    predictions.json      COCO panoptic: images, annotations (image_id, file_name, segments_info), categories
    predictions/          one RGB PNG per image, named like the ground-truth PNG (ids 1..n, 0 = void)
    metrics.json          percentages + per-class names + panopticapi's fractions (``results_to_metrics``)
    per_class_pq.png      per-class PQ/SQ/RQ bars

``evaluate_checkpoint`` builds the model and the dataset from a checkpoint, a config and/or flags;
the ``evaluate`` command calls it.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.evaluation import (
    PanopticPredictionWriter,
    format_results,
    load_panoptic_json,
    pq_compute,
    results_to_metrics,
)
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)

PREDICTIONS_JSON = "predictions.json"
METRICS_JSON = "metrics.json"
CHART_PNG = "per_class_pq.png"


def _unwrap(dataset: Any) -> tuple[Any, list[int]]:
    """(COCO panoptic dataset, indices) for a dataset or a ``torch.utils.data.Subset`` of one."""
    if isinstance(dataset, torch.utils.data.Subset):
        base, inner = _unwrap(dataset.dataset)
        return base, [inner[i] for i in dataset.indices]
    for attribute in ("annotations", "json_path", "panoptic_dir", "image_path", "images"):
        if not hasattr(dataset, attribute):
            raise UserInputError(f"evaluate_model needs a COCO panoptic dataset (CocoPanopticDataset); "
                                 f"{type(dataset).__name__} has no {attribute!r}")
    return dataset, list(range(len(dataset.annotations)))


def check_categories(category_map: CategoryMap, gt_categories: Sequence[Mapping[str, Any]], *, source: str) -> None:
    """The model must predict only category ids that the ground truth knows (else PQ cannot count them)."""
    known = {int(c["id"]) for c in gt_categories}
    predicted = {c.id for c in category_map.categories if c.id in set(category_map.class_ids)}
    unknown = sorted(predicted - known)
    if unknown:
        names = {c.id: c.name for c in category_map.categories}
        listed = ", ".join(f"{i} ({names[i]})" for i in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise UserInputError(f"the model predicts category ids that {source} does not have: {listed}. "
                             "Evaluate on data with the model's categories (Cityscapes: check --use-train-id)")


def evaluate_model(model: torch.nn.Module, dataset: Any, out_dir: str | os.PathLike, *,
                   category_map: CategoryMap | None = None, threshold: float = 0.85, batch_size: int = 1,
                   size: int | None = None, max_size: int | None = None,
                   device: str | torch.device | None = None, workers: int | None = None,
                   limit: int | None = None, progress: bool = True, chart: bool = True,
                   extra_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Predict every image of ``dataset`` (a ``CocoPanopticDataset`` or a ``Subset`` of one) and compute PQ.

    Images go through the ``predict`` path (``engine.inference.iter_predictions``: resized to
    ``size``/``max_size``, default the dataset's ``min_size``/``max_size``, batched, results at the
    original resolution). PQ is computed against the dataset's own JSON + PNGs with ``workers``
    processes. Returns ``{"results" (pq_compute's dict), "metrics", "table", "predictions_json",
    "metrics_json", "chart", "num_images", "seconds"}``.
    """
    from tqdm import tqdm

    from detr_panoptic.engine.inference import iter_predictions, model_category_map

    start = time.perf_counter()
    base, indices = _unwrap(dataset)
    if limit is not None:
        indices = indices[:max(0, limit)]
    if not indices:
        raise UserInputError(f"{base.json_path}: no image to evaluate")
    category_map = category_map or model_category_map(model)
    gt = load_panoptic_json(base.json_path, what="ground-truth JSON")
    check_categories(category_map, gt.get("categories", []), source=str(base.json_path))
    annotations = [base.annotations[i] for i in indices]
    records = [base.images[ann["image_id"]] for ann in annotations]
    paths = [Path(base.image_path(record)) for record in records]

    out_dir = Path(out_dir)
    json_path = out_dir / PREDICTIONS_JSON
    writer = PanopticPredictionWriter(json_path, out_dir / json_path.stem, gt["categories"])
    stream = iter_predictions(model, paths, category_map=category_map, threshold=threshold,
                              size=size if size is not None else getattr(base, "min_size", 800),
                              max_size=max_size if max_size is not None else getattr(base, "max_size", 1333),
                              batch_size=batch_size, device=device)
    images = []
    for annotation, record, prediction in tqdm(zip(annotations, records, stream), total=len(paths),
                                               unit="image", desc="evaluate", disable=not progress):
        writer.add(annotation["image_id"], prediction.result.id_map, prediction.result.segments_info,
                   file_name=annotation["file_name"])
        images.append({"id": annotation["image_id"], "file_name": record.get("file_name", paths[len(images)].name),
                       "height": prediction.image.height, "width": prediction.image.width})
    if len(images) != len(paths):
        raise RuntimeError(f"got {len(images)} predictions for {len(paths)} images")
    atomic_write_json(json_path, {"images": images, "annotations": writer.annotations,
                                  "categories": writer.categories})
    predict_seconds = time.perf_counter() - start

    gt_source: Any = base.json_path
    if len(annotations) != len(gt["annotations"]):
        gt_source = dict(gt, annotations=annotations)  # only the evaluated images count
    results = pq_compute(gt_source, json_path, base.panoptic_dir, writer.png_folder, workers=workers)
    metrics = results_to_metrics(results, gt["categories"])
    metrics.update({"num_images": len(annotations), "threshold": threshold,
                    "gt_json": str(base.json_path), "predictions_json": str(json_path),
                    "predict_seconds": round(predict_seconds, 3),
                    "pq_seconds": round(time.perf_counter() - start - predict_seconds, 3)})
    metrics.update(extra_metrics or {})
    metrics_json = out_dir / METRICS_JSON
    atomic_write_json(metrics_json, metrics)
    chart_path = None
    if chart:
        from detr_panoptic.visualize.charts import per_class_bar_chart

        chart_path = per_class_bar_chart(results, gt["categories"], out_dir / CHART_PNG)
    log.info("PQ %.2f  SQ %.2f  RQ %.2f over %d images -> %s", metrics["pq"], metrics["sq"], metrics["rq"],
             len(annotations), out_dir)
    return {"results": results, "metrics": metrics, "table": format_results(results, gt["categories"]),
            "predictions_json": json_path, "metrics_json": metrics_json, "chart": chart_path,
            "num_images": len(annotations), "seconds": time.perf_counter() - start}


def default_out_dir(checkpoint: str | os.PathLike) -> Path:
    """``<run>/eval`` for a checkpoint at ``<run>/checkpoints/<name>.pth``, else ``./eval``."""
    path = Path(str(checkpoint))
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent / "eval"
    return Path("eval")


def build_eval_dataset(*, config: Any = None, cityscapes_root: str | None = None, split: str | None = None,
                       use_train_id: bool = False, gt_json: str | None = None, gt_folder: str | None = None,
                       image_dir: str | None = None) -> Any:
    """The dataset to evaluate on: from the flags when given, else from ``config.data`` (its val split)."""
    from detr_panoptic.data.coco_panoptic import CocoPanopticDataset, cityscapes_panoptic_dataset

    data = config.data if config is not None else None
    sizes: dict[str, Any] = {"min_size": data.min_size, "max_size": data.max_size} if data is not None else {}
    if cityscapes_root and gt_json:
        raise UserInputError("give either --cityscapes ROOT or --gt-json/--gt-folder/--image-dir, not both")
    if cityscapes_root or (not gt_json and data is not None and data.dataset == "cityscapes"):
        root = cityscapes_root or (data.root if data is not None else "")
        if not root:
            raise UserInputError("no Cityscapes root: pass --cityscapes ROOT or set data.root in the config")
        split = split or (data.val_split if data is not None else "val")
        train_id = use_train_id or (data is not None and data.use_train_id)
        return cityscapes_panoptic_dataset(root, split, train_id, **sizes)
    if gt_json or (data is not None and data.dataset == "coco"):
        json_path = gt_json or data.val_json
        folder = gt_folder or (data.val_panoptic_dir if data is not None and not gt_json else None)
        folder = folder or str(Path(json_path).with_suffix(""))
        images = image_dir or (data.val_image_dir if data is not None and not gt_json else None)
        if not images:
            raise UserInputError("--gt-json needs --image-dir (the folder of the input images)")
        return CocoPanopticDataset(json_path, folder, images, **sizes)
    raise UserInputError("no data to evaluate on: pass --cityscapes ROOT [--split val], or --gt-json F "
                         "--image-dir D [--gt-folder D], or a --config with a data section")


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, config: str | None = None, overrides: Sequence[str] = (),
                        cityscapes_root: str | None = None, split: str | None = None, use_train_id: bool = False,
                        gt_json: str | None = None, gt_folder: str | None = None, image_dir: str | None = None,
                        out_dir: str | os.PathLike | None = None, batch_size: int = 1, threshold: float = 0.85,
                        device: str | None = "auto", workers: int | None = None, limit: int | None = None,
                        size: int | None = None, max_size: int | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Load ``checkpoint`` (``checkpoints.load_pretrained``), pick the data (flags, else the config's
    val split) and run ``evaluate_model``; ``out_dir`` defaults to the run's ``eval/``. ``size``/``max_size``
    (the model's input resize) default to the config's ``data.min_size``/``data.max_size``, else to the
    size the checkpoint was trained with (``model.input_size``), else 800/1333."""
    from detr_panoptic.checkpoints import load_pretrained
    from detr_panoptic.config import load_config

    loaded_config = load_config(config, overrides) if config or overrides else None
    dataset = build_eval_dataset(config=loaded_config, cityscapes_root=cityscapes_root, split=split,
                                 use_train_id=use_train_id, gt_json=gt_json, gt_folder=gt_folder,
                                 image_dir=image_dir)
    model = load_pretrained(checkpoint)
    if loaded_config is None:  # no data section to say the size: the checkpoint's, else 800/1333
        from detr_panoptic.engine.inference import model_input_size

        size, max_size = model_input_size(model, size, max_size)
    if loaded_config is not None and loaded_config.data.max_val_images is not None and limit is None:
        limit = loaded_config.data.max_val_images
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint)
    return evaluate_model(model, dataset, out, threshold=threshold, batch_size=batch_size, device=device,
                          workers=workers, limit=limit, progress=progress, size=size, max_size=max_size,
                          extra_metrics={"checkpoint": str(checkpoint)})
