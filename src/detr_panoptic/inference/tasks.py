"""The commands' library functions, each one ``run_inference`` with a loader and evaluators.

* ``predict_to_folder(predictor, inputs, out)``: image files -> COCO panoptic PNGs + JSON + overlays
  (``detr-panoptic predict``); restartable.
* ``evaluate_dataset(predictor, dataset, out)``: a COCO-panoptic split -> predictions in COCO panoptic
  format + PQ (``detr-panoptic evaluate``, the demo); restartable.
* ``evaluate_checkpoint(checkpoint, EvalData, LoadOptions)``: the ``evaluate`` command's glue (checkpoint,
  config, the data flags, the predictor's options -> the two above).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from detr_panoptic.data.categories import CategoryMap
from detr_panoptic.inference.cityscapes_writer import CityscapesWriter
from detr_panoptic.inference.coco_metrics import CocoMetrics
from detr_panoptic.inference.evaluators import (
    DetectionEvaluator,
    OverlayWriter,
    PanopticWriter,
    PQEvaluator,
    detection_metrics,
)
from detr_panoptic.inference.predictor import PanopticPredictor
from detr_panoptic.inference.runner import make_loader, run_inference
from detr_panoptic.inference.samples import DatasetSamples, ImageFiles, expand_inputs
from detr_panoptic.models.dense_outputs import DenseOutputs
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.io import atomic_write_json

log = logging.getLogger(__name__)

PREDICTIONS_JSON = "predictions.json"
METRICS_JSON = "metrics.json"
CHART_PNG = "per_class_pq.png"
CITYSCAPES_DIR = "cityscapes"
# How Cityscapes' semantic map and instances are made when a predictor does not say: from the queries
# (Mask2Former's inference), better than reading them off the panoptic result on the demo's model
# (bench/cityscapes_outputs.py, docs/metrics.md).
DEFAULT_DENSE_OUTPUTS = DenseOutputs(semantic="queries", instances="queries")


def _fingerprint(predictor: PanopticPredictor, **extra: Any) -> dict[str, Any]:
    """What a restartable folder's outputs depend on: a writer reopened with another one starts over."""
    s = predictor.settings
    dense = getattr(predictor, "dense", None)  # how the semantic map and instances are made (Cityscapes files)
    return {"weights": predictor.weights_fingerprint(), "input_size": [s.min_size, s.max_size],
            "postprocess": s.postprocess_metadata(), "dtype": str(predictor.dtype),
            "dense": None if dense is None else asdict(dense), **extra}


def default_workers(count: int) -> int:
    """Loader workers: one decodes ahead of the model when there is more than one image (0: in-process)."""
    return 1 if count > 1 and (os.cpu_count() or 1) > 1 else 0


@dataclass
class PredictSummary:
    out_dir: Path
    predictions_json: Path | None
    processed: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    resumed: int = 0


def predict_to_folder(predictor: PanopticPredictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                      *, batch_size: int = 1, skip_bad: bool = False, overlays: bool = True,
                      progress: bool = True, num_workers: int | None = None, cityscapes: bool = False,
                      dense: DenseOutputs | None = None) -> PredictSummary:
    """Predict every input image (files, folders, globs) and write, under ``out_dir``:

    * ``predictions/<name>.png``: COCO panoptic PNG at the original image size (id = R + 256 G + 256^2 B);
    * ``overlays/<name>.png``: the prediction drawn over the image;
    * ``predictions.json``: COCO panoptic ``images``, ``annotations`` and ``categories``;
    * with ``cityscapes``: ``cityscapes/semantic/<name>.png`` and ``cityscapes/instance/<name>.txt`` + masks
      (``CityscapesWriter``; the model must have Cityscapes categories), the semantic map and instances
      from the queries unless ``dense`` (or the predictor's own) says otherwise (``DEFAULT_DENSE_OUTPUTS``).

    ``<name>`` is the input's stem (made unique). Killed and started again with the same weights and
    settings, it keeps the images already written and predicts the rest. Raises ``UserInputError`` if
    no image could be processed (every input bad, under ``skip_bad``).
    """
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    settings = predictor.settings
    if cityscapes and predictor.dense is None:
        predictor = predictor.with_dense_outputs(dense or DEFAULT_DENSE_OUTPUTS)
    paths = expand_inputs(inputs, skip_bad=skip_bad)
    out_dir = Path(out_dir)
    files = ImageFiles(paths, min_size=settings.min_size, max_size=settings.max_size, skip_bad=skip_bad,
                       keep_original=overlays)
    writer = PanopticWriter(out_dir / PREDICTIONS_JSON, out_dir / "predictions", categories=settings.category_map,
                            resume=True, fingerprint=_fingerprint(predictor, overlays=overlays, cityscapes=cityscapes))
    todo = [i for i, name in enumerate(files.names) if f"{name}.png" not in writer.done]
    evaluators: list[Any] = [writer]
    if overlays:  # before the writer: an image is journalled as done only once its overlay exists too
        evaluators.insert(0, OverlayWriter(out_dir / "overlays", settings.category_map))
    if cityscapes:
        evaluators.insert(0, CityscapesWriter(out_dir / CITYSCAPES_DIR, settings.category_map))
    loader = make_loader(torch.utils.data.Subset(files, todo), batch_size=batch_size,
                         num_workers=default_workers(len(todo)) if num_workers is None else num_workers)
    run = run_inference(predictor, loader, evaluators, progress=progress, total=len(todo), description="predict",
                        reset=False)
    summary = PredictSummary(out_dir=out_dir, predictions_json=None, skipped=run.skipped,
                             resumed=len(paths) - len(todo))
    skipped = {str(path) for path, _ in run.skipped}
    summary.processed = [p for p in paths if str(p) not in skipped]
    if not summary.processed:
        raise UserInputError(f"no image could be processed ({len(summary.skipped)} skipped)")
    summary.predictions_json = run.outputs["predictions"]["json"]
    return summary


# -- evaluation -------------------------------------------------------------------------------------------
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


def evaluation_split(predictor: PanopticPredictor, dataset: Any, *, limit: int | None, what: str
                     ) -> tuple[DatasetSamples, int, dict[str, Any]]:
    """(samples at the predictor's input size, how many to use, the ground-truth JSON) for ``dataset``;
    ``UserInputError`` when there is no image or the model predicts categories the ground truth lacks."""
    from detr_panoptic.evaluation import load_panoptic_json

    samples = DatasetSamples(dataset, min_size=predictor.settings.min_size, max_size=predictor.settings.max_size)
    base = samples.dataset
    count = len(samples) if limit is None else min(len(samples), max(0, limit))
    if count == 0:
        raise UserInputError(f"{base.json_path}: no image to {what}")
    gt = load_panoptic_json(base.json_path, what="ground-truth JSON")
    check_categories(predictor.settings.category_map, gt.get("categories", []), source=str(base.json_path))
    return samples, count, gt


def _file_evaluators(writer: PanopticWriter, detection: DetectionEvaluator, categories: Any, out_dir: Path, *,
                     cityscapes: bool, complete: bool) -> list[Any]:
    """The evaluators of an evaluation that writes its predictions (``complete``: no image was done before)."""
    evaluators: list[Any] = [writer]
    if cityscapes:  # before the journal: an image is done once its Cityscapes files exist too
        evaluators.insert(0, CityscapesWriter(out_dir / CITYSCAPES_DIR, categories))
    elif complete:  # other datasets: mIoU and COCO mask AP in memory (not kept on resume)
        evaluators.append(CocoMetrics(categories))
    if complete:  # detection figures need every image's kept queries (not kept on resume)
        evaluators.append(detection)
    return evaluators


def _add_coco_metrics(metrics: dict[str, Any], coco: Mapping[str, Any]) -> str:
    """mIoU and COCO mask AP into ``metrics`` (per class IoU too); their line of the printed table."""
    metrics.update({k: coco[k] for k in ("miou", "mask_ap", "mask_ap50", "mask_ap75")})
    for key, value in coco["iou_per_class"].items():
        metrics["per_class"].setdefault(key, {})["iou"] = value
    return "  ".join(f"{name} {'-' if metrics[key] is None else f'{metrics[key]:.1f}'}" for name, key in
                     (("mIoU", "miou"), ("mask AP", "mask_ap"), ("AP50", "mask_ap50")))


def evaluate_dataset(predictor: PanopticPredictor, dataset: Any, out_dir: str | os.PathLike, *,
                     batch_size: int = 1, workers: int | None = None, num_workers: int | None = None,
                     limit: int | None = None, progress: bool = True, chart: bool = True, write: bool = True,
                     extra_metrics: Mapping[str, Any] | None = None, dense: DenseOutputs | None = None
                     ) -> dict[str, Any]:
    """Predict every image of ``dataset`` (a ``CocoPanopticDataset`` or a ``Subset`` of one) and measure PQ.

    Writes into ``out_dir``: ``predictions.json`` + ``predictions/`` (COCO panoptic, PNGs named like the
    ground truth's; restartable), ``metrics.json`` (percentages, per class, the settings) and
    ``per_class_pq.png``. PQ is computed with ``evaluation.pq_compute`` on the written files against
    the dataset's ground truth (``workers`` processes), at the original resolution; ``write=False``
    measures it in memory instead (``PQEvaluator``, the same numbers) and writes only ``metrics.json``.
    ``metrics.json`` also holds the detection figures of things (``things_recall``, ``things_kept_per_gt``,
    ``things_duplicates_per_gt``, ``things_kept_ratio``, ``things_mask_iou``, ``detection_per_class``;
    ``things_segment_recall`` and ``things_segment_duplicates_per_gt`` for the output's thing segments;
    ``DetectionEvaluator``), except after a resumed run.
    Returns ``{"results" (pq_compute's dict), "metrics", "table", "predictions_json", "metrics_json",
    "chart", "num_images", "seconds"}``.
    """
    from detr_panoptic.evaluation import format_results, pq_compute, results_to_metrics

    start = time.perf_counter()
    samples, count, gt = evaluation_split(predictor, dataset, limit=limit, what="evaluate")
    base = samples.dataset
    annotations = [samples.annotation(i) for i in range(count)]
    out_dir = Path(out_dir)
    json_path = out_dir / PREDICTIONS_JSON
    detection = DetectionEvaluator(predictor.settings.category_map)
    cityscapes = cityscapes_split(base) if write else None
    if predictor.dense is None:  # Cityscapes' formats, or mIoU and mask AP: the semantic map and instances
        predictor = predictor.with_dense_outputs(dense or DEFAULT_DENSE_OUTPUTS)
    if write:
        writer = PanopticWriter(json_path, out_dir / "predictions", categories=gt["categories"], resume=True,
                                fingerprint=_fingerprint(predictor, gt_json=str(base.json_path)))
        todo = [i for i in range(count) if annotations[i]["file_name"] not in writer.done]
        evaluators = _file_evaluators(writer, detection, gt["categories"], out_dir, cityscapes=cityscapes is not None,
                                      complete=len(todo) == count)
    else:
        todo, evaluators = list(range(count)), [PQEvaluator(gt["categories"]), detection]
    loader = make_loader(torch.utils.data.Subset(samples, todo), batch_size=batch_size,
                         num_workers=default_workers(len(todo)) if num_workers is None else num_workers)
    run = run_inference(predictor, loader, evaluators, progress=progress, total=len(todo), description="evaluate",
                        reset=False)
    predict_seconds = time.perf_counter() - start
    if write:
        gt_source: Any = base.json_path
        if count != len(gt["annotations"]):
            gt_source = dict(gt, annotations=annotations)  # only the evaluated images count
        results = pq_compute(gt_source, json_path, base.panoptic_dir, out_dir / "predictions", workers=workers)
    else:
        results = run.outputs["pq"]
    s = predictor.settings
    metrics = results_to_metrics(results, gt["categories"])
    metrics.update({"num_images": count, "threshold": s.threshold, "merge_stuff": s.merge_stuff,
                    "min_area": s.min_area, "input_size": [s.min_size, s.max_size],
                    "gt_json": str(base.json_path), "predictions_json": str(json_path) if write else None,
                    "predict_seconds": round(predict_seconds, 3),
                    "pq_seconds": round(time.perf_counter() - start - predict_seconds, 3)})
    if "detection" in run.outputs:
        metrics.update(detection_metrics(run.outputs["detection"]))
    table = format_results(results, gt["categories"])
    if "coco" in run.outputs:
        table += "\n" + _add_coco_metrics(metrics, run.outputs["coco"])
    if cityscapes is not None:
        table += "\n" + _add_cityscapes_metrics(metrics, out_dir, cityscapes, [a["image_id"] for a in annotations],
                                               workers)
    metrics.update(extra_metrics or {})
    metrics_json = out_dir / METRICS_JSON
    atomic_write_json(metrics_json, metrics)
    chart_path = None
    if chart:
        from detr_panoptic.visualize.charts import per_class_bar_chart

        chart_path = per_class_bar_chart(results, gt["categories"], out_dir / CHART_PNG)
    log.info("PQ %.2f  SQ %.2f  RQ %.2f over %d images -> %s", metrics["pq"], metrics["sq"], metrics["rq"],
             count, out_dir)
    return {"results": results, "metrics": metrics, "table": table,
            "predictions_json": json_path if write else None, "metrics_json": metrics_json, "chart": chart_path,
            "num_images": count, "seconds": time.perf_counter() - start}


def cityscapes_split(dataset: Any) -> tuple[Path, str] | None:
    """(Cityscapes root, split) of a converted Cityscapes dataset; None for other datasets."""
    from detr_panoptic.data.coco_panoptic import CityscapesImagePath

    image_path = getattr(dataset, "image_path_fn", None)
    return (Path(image_path.root), image_path.split) if isinstance(image_path, CityscapesImagePath) else None


def _add_cityscapes_metrics(metrics: dict[str, Any], out_dir: Path, cityscapes: tuple[Path, str],
                            stems: Sequence[str], workers: int | None) -> str:
    """Score ``out_dir/cityscapes`` (semantic + instance) against gtFine, merge the figures into
    ``metrics`` (percentages; per class by name) and return their table lines."""
    from detr_panoptic.evaluation.cityscapes import evaluate_cityscapes_results

    start = time.perf_counter()
    root, split = cityscapes
    scores = evaluate_cityscapes_results(out_dir, root, split, parts=("semantic", "instance"), stems=stems,
                                         workers=workers)
    for key in ("miou", "iiou", "category_miou", "category_iiou", "ap", "ap50", "per_category"):
        metrics[key] = scores[key]
    by_name = {entry["name"]: entry for entry in scores["per_class"].values()}
    for entry in metrics["per_class"].values():
        extra = by_name.get(entry.get("name"), {})
        entry.update({k: extra[k] for k in ("iou", "iiou", "ap", "ap50") if k in extra})
    metrics["cityscapes_seconds"] = round(time.perf_counter() - start, 3)
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"
    return (f"mIoU {show(scores['miou'])}  iIoU {show(scores['iiou'])}  category IoU {show(scores['category_miou'])}"
            f"  AP {show(scores['ap'])}  AP50 {show(scores['ap50'])}  (Cityscapes formats in {out_dir / CITYSCAPES_DIR})")


def default_out_dir(checkpoint: str | os.PathLike) -> Path:
    """``<run>/eval`` for a checkpoint at ``<run>/checkpoints/<name>.pth``, else ``./eval``."""
    path = Path(str(checkpoint))
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent / "eval"
    return Path("eval")


@dataclass(frozen=True)
class EvalData:
    """Where an evaluation's data comes from (the ``evaluate``/``calibrate`` data flags): a Cityscapes root
    (``split``, ``use_train_id``), or COCO-panoptic files (``gt_json``, ``gt_folder``, ``image_dir``);
    nothing given: the config's val split."""

    cityscapes_root: str | None = None
    split: str | None = None
    use_train_id: bool = False
    gt_json: str | None = None
    gt_folder: str | None = None
    image_dir: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    """How ``evaluate`` loads its predictor (``PanopticPredictor.from_pretrained``'s options; None: the
    checkpoint's setting)."""

    device: str | None = "auto"
    dtype: str | None = None
    threshold: float | None = None
    size: int | None = None
    max_size: int | None = None


def build_eval_dataset(source: EvalData = EvalData(), *, config: Any = None) -> Any:
    """The dataset to evaluate on: from ``source`` (the flags) when given, else from ``config.data`` (its
    val split)."""
    from detr_panoptic.data.coco_panoptic import CocoPanopticDataset, cityscapes_panoptic_dataset

    data = config.data if config is not None else None
    if source.cityscapes_root and source.gt_json:
        raise UserInputError("give either --cityscapes ROOT or --gt-json/--gt-folder/--image-dir, not both")
    if source.cityscapes_root or (not source.gt_json and data is not None and data.dataset == "cityscapes"):
        root = source.cityscapes_root or (data.root if data is not None else "")
        if not root:
            raise UserInputError("no Cityscapes root: pass --cityscapes ROOT or set data.root in the config")
        split = source.split or (data.val_split if data is not None else "val")
        train_id = source.use_train_id or (data is not None and data.use_train_id)
        return cityscapes_panoptic_dataset(root, split, train_id)
    if source.gt_json or (data is not None and data.dataset == "coco"):
        from_config = data is not None and not source.gt_json
        json_path = source.gt_json or data.val_json
        folder = source.gt_folder or (data.val_panoptic_dir if from_config else None)
        folder = folder or str(Path(json_path).with_suffix(""))
        images = source.image_dir or (data.val_image_dir if from_config else None)
        if not images:
            raise UserInputError("--gt-json needs --image-dir (the folder of the input images)")
        return CocoPanopticDataset(json_path, folder, images)
    raise UserInputError("no data to evaluate on: pass --cityscapes ROOT [--split val], or --gt-json F "
                         "--image-dir D [--gt-folder D], or a --config with a data section")


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: EvalData = EvalData(),
                        options: LoadOptions = LoadOptions(), *, config: str | None = None,
                        overrides: Sequence[str] = (), out_dir: str | os.PathLike | None = None, batch_size: int = 1,
                        workers: int | None = None, limit: int | None = None, progress: bool = True
                        ) -> dict[str, Any]:
    """The ``evaluate`` command: a predictor from ``checkpoint`` (its settings, then the config's
    ``data.min_size``/``max_size`` and ``train.eval_threshold``, then ``options``), the data from ``data``
    or the config's val split, then ``evaluate_dataset``; ``out_dir`` defaults to the run's ``eval/``."""
    from detr_panoptic.config import load_config

    loaded_config = load_config(config, overrides) if config or overrides else None
    dataset = build_eval_dataset(data, config=loaded_config)
    if loaded_config is not None:  # the config says how its model was trained and validated
        options = replace(options, size=_first(options.size, loaded_config.data.min_size),
                          max_size=_first(options.max_size, loaded_config.data.max_size),
                          threshold=_first(options.threshold, loaded_config.train.eval_threshold))
        if loaded_config.data.max_val_images is not None and limit is None:
            limit = loaded_config.data.max_val_images
    predictor = PanopticPredictor.from_pretrained(checkpoint, **asdict(options))
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint)
    return evaluate_dataset(predictor, dataset, out, batch_size=batch_size, workers=workers, limit=limit,
                            progress=progress, extra_metrics={"checkpoint": str(checkpoint)})


def _first(value: Any, fallback: Any) -> Any:
    return value if value is not None else fallback
