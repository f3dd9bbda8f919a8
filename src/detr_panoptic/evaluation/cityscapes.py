"""Score a folder of Cityscapes results (any model's) against a split's ground truth: panoptic
quality, the pixel-level scores (class/category IoU and iIoU) and the instance-level AP, each equal
to its reference (panopticapi / cityscapesScripts), from one decode of every file.

A results folder holds any of (``RESULTS`` or ``RESULTS/cityscapes``)::

    semantic/<city>_<seq>_<frame>*.png          labelIds at the original size (8-bit)
    instance/<city>_<seq>_<frame>*.txt          "<mask path relative to the .txt> <labelId> <confidence>"
    instance/**/<mask>.png                      per line: the instance's pixels are the non-zero ones
    predictions.json + predictions/ (or panoptic.json + panoptic/)   COCO panoptic, labelIds as category ids

Files are found as cityscapesScripts finds them (by the image's ``<city>_<seq>_<frame>`` prefix,
anywhere under the part's folder; two candidates for one image is an error). The ground truth is
``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` (and ``*_labelIds.png`` for the pixel-level scores);
the panoptic ground truth is derived from instanceIds exactly as cityscapesScripts' converter does it,
so the converted JSON is not needed.

Each image is one task for a pool of threads (PNG inflating and unfiltering release the GIL):
instanceIds is decoded once and serves all three metrics. No process is started, so a script without
a main guard is fine.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.evaluation.instance import InstanceAccumulator, InstancePrediction, value_counts
from detr_panoptic.evaluation.panoptic_format import load_panoptic_json, read_id_png
from detr_panoptic.evaluation.pq import average_pq
from detr_panoptic.evaluation.pq_stats import CategoryTable, image_pq_stats, runs
from detr_panoptic.evaluation.semantic import NUM_LABEL_IDS, PixelLevelAccumulator, cityscapes_labels
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.parallel import available_cores
from detr_panoptic.utils.png import decode_grey16_png
from detr_panoptic.utils.png_grey import read_grey8_packed, read_mask_pixels

log = logging.getLogger(__name__)

PARTS = ("panoptic", "semantic", "instance")
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class GroundTruthImage:
    stem: str  # <city>_<seq>_<frame>
    instance_ids: Path
    label_ids: Path


@dataclass(frozen=True)
class ResultsLayout:
    """Where each part of a results folder is (None: the part is absent)."""

    semantic: Path | None = None
    instance: Path | None = None
    panoptic_json: Path | None = None
    panoptic_folder: Path | None = None

    @property
    def parts(self) -> list[str]:
        return [p for p, present in zip(PARTS, (self.panoptic_json, self.semantic, self.instance)) if present]


def ground_truth_images(cityscapes_root: str | os.PathLike, split: str) -> list[GroundTruthImage]:
    """The split's images (sorted), from ``gtFine/<split>/<city>/*_gtFine_instanceIds.png``."""
    folder = Path(cityscapes_root) / "gtFine" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"Cityscapes ground truth {folder} not found (expected ROOT/gtFine/{split}/<city>/)")
    images = []
    for path in sorted(folder.glob(f"*/*{INSTANCE_SUFFIX}")):
        stem = path.name[: -len(INSTANCE_SUFFIX)]
        images.append(GroundTruthImage(stem, path, path.with_name(stem + LABEL_SUFFIX)))
    if not images:
        raise UserInputError(f"{folder}: no *{INSTANCE_SUFFIX} files (the test split has no ground truth)")
    return images


def find_results(results: str | os.PathLike, *, semantic: str | os.PathLike | None = None,
                 instance: str | os.PathLike | None = None, panoptic_json: str | os.PathLike | None = None,
                 panoptic_folder: str | os.PathLike | None = None) -> ResultsLayout:
    """The parts of the results folder ``results`` (see the module docstring); explicit paths win."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} not found")
    bases = [root / "cityscapes", root] if (root / "cityscapes").is_dir() else [root]

    def first(name: str) -> Path | None:
        return next((b / name for b in bases if (b / name).is_dir()), None)

    semantic_dir = Path(semantic) if semantic else first("semantic")
    instance_dir = Path(instance) if instance else first("instance")
    json_path = Path(panoptic_json) if panoptic_json else None
    if json_path is None:
        json_path = next((b / f"{n}.json" for b in bases for n in ("panoptic", "predictions")
                          if (b / f"{n}.json").is_file()), None)
    folder = Path(panoptic_folder) if panoptic_folder else (json_path.with_suffix("") if json_path else None)
    for what, path in (("semantic folder", semantic_dir), ("instance folder", instance_dir),
                       ("panoptic PNG folder", folder)):
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"{what} {path} not found")
    layout = ResultsLayout(semantic_dir, instance_dir, json_path, folder)
    if not layout.parts:
        raise UserInputError(f"{root}: no results found (expected semantic/, instance/ or predictions.json + "
                             "predictions/, directly or under cityscapes/)")
    return layout


def match_files(folder: Path, images: Sequence[GroundTruthImage], suffix: str, what: str) -> list[Path]:
    """Per image, the one file ``<stem>*<suffix>`` under ``folder`` (walked once, as the reference does)."""
    found: dict[str, list[Path]] = {}
    prefix_of = {image.stem: image.stem for image in images}
    for directory, _, names in os.walk(folder):
        for name in fnmatch.filter(names, f"*{suffix}"):
            stem = "_".join(os.path.splitext(name)[0].split("_")[:3])
            if stem in prefix_of:
                found.setdefault(stem, []).append(Path(directory) / name)
    paths = []
    for image in images:
        candidates = found.get(image.stem, [])
        if not candidates:
            raise FileNotFoundError(f"no {what} for image {image.stem} in {folder} (expected a file "
                                    f"{image.stem}*{suffix})")
        if len(candidates) > 1:
            raise UserInputError(f"{len(candidates)} {what}s for image {image.stem}: "
                                 f"{', '.join(str(c) for c in candidates[:3])}")
        paths.append(candidates[0])
    return paths


def read_instance_list(path: Path, root: Path) -> list[tuple[Path, int, float]]:
    """The lines of a Cityscapes instance result ``.txt``: (mask path, labelId, confidence)."""
    entries: dict[Path, tuple[int, float]] = {}  # the reference keys by mask path: a repeat replaces
    root = root.resolve()
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            fields = line.split(" ")
            if len(fields) != 3:
                raise UserInputError(f"{path} line {number}: expected '<mask.png> <labelId> <confidence>' "
                                     f"separated by single spaces, got {line.rstrip()!r}")
            if os.path.isabs(fields[0]):
                raise UserInputError(f"{path} line {number}: the mask path must be relative to the .txt")
            mask = (path.parent / fields[0]).resolve()
            if os.path.commonpath([mask, root]) != str(root):
                raise UserInputError(f"{path} line {number}: mask {fields[0]} points outside {root}")
            try:
                entries[mask] = (int(float(fields[1])), float(fields[2]))
            except ValueError:
                raise UserInputError(f"{path} line {number}: labelId and confidence must be numbers, "
                                     f"got {fields[1]!r} {fields[2].rstrip()!r}") from None
    return [(mask, label, confidence) for mask, (label, confidence) in entries.items()]


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
def read_instance_ids(path: Path) -> np.ndarray:
    """uint16 ``[H, W]`` of a ``*_gtFine_instanceIds.png`` (zlib-ng + our unfilter, else Pillow)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"ground truth {path} not found") from None
    array = decode_grey16_png(data, str(path))
    if array is None:
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot decode the instance id PNG: {exc}") from None
        if array.ndim != 2 or array.size and (array.min() < 0 or array.max() > 65535):
            raise UserInputError(f"{path}: expected a 16-bit greyscale instance id PNG")
        array = array.astype(np.uint16)
    return array


@dataclass(frozen=True)
class _Tables:
    """Per instanceIds value (0..65535): the panoptic ground-truth id (0 = VOID) and its labelId."""

    panoptic_id: np.ndarray
    label_of: np.ndarray
    categories: CategoryTable


def _tables() -> _Tables:
    labels = cityscapes_labels()
    values = np.arange(1 << 16)
    label_of = np.where(values < 1000, values, values // 1000)
    known = label_of < NUM_LABEL_IDS
    kept = np.zeros_like(known)
    kept[known] = labels.scored[label_of[known]]
    panoptic_id = np.where(kept, values, 0).astype(np.uint32)
    records = [{"id": i, "name": labels.names[i], "isthing": int(i in labels.instance_classes)}
               for i in labels.scored_ids]
    return _Tables(panoptic_id, label_of, CategoryTable(records))


def _gt_segments(values: np.ndarray, sizes: np.ndarray, tables: _Tables) -> list[dict[str, Any]]:
    """The panoptic ground truth's segments from instanceIds' values and pixel counts (ignored
    labels are VOID; a thing class's own id is its crowd region)."""
    keep = tables.panoptic_id[values] != 0
    segments = []
    for value, size in zip(values[keep].tolist(), sizes[keep].tolist()):
        label = int(tables.label_of[value])
        crowd = value < 1000 and bool(tables.categories.isthing[tables.categories.index[label]])
        segments.append({"id": value, "category_id": label, "area": size, "iscrowd": int(crowd)})
    return segments


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
@dataclass
class _ImageJob:
    image: GroundTruthImage
    semantic: Path | None = None
    instance: Path | None = None
    instance_root: Path | None = None
    panoptic_png: Path | None = None
    panoptic_segments: list[dict[str, Any]] | None = None


@dataclass
class _ImageResult:
    pq: np.ndarray | None = None
    pixel: PixelLevelAccumulator | None = None
    instance: InstanceAccumulator | None = None


def _check_shape(shape: tuple[int, ...], gt: np.ndarray, what: str, path: Path, gt_path: Path) -> None:
    if tuple(shape) != gt.shape:
        raise UserInputError(f"{what} {path} is {shape[1]}x{shape[0]} but the ground truth {gt_path} is "
                             f"{gt.shape[1]}x{gt.shape[0]} (width x height): results must have the original size")


def _score_image(job: _ImageJob, tables: _Tables) -> _ImageResult:
    image = job.image
    gt_instances = read_instance_ids(image.instance_ids)
    values_and_sizes = value_counts(gt_instances) if job.instance or job.panoptic_png else None
    result = _ImageResult()
    if job.semantic is not None:
        gt_labels = read_grey8_packed(image.label_ids, what="ground truth")  # values in the low byte
        _check_shape(gt_labels.shape, gt_instances, "ground truth", image.label_ids, image.instance_ids)
        prediction = read_grey8_packed(job.semantic, what="semantic result")
        _check_shape(prediction.shape, gt_instances, "semantic result", job.semantic, image.instance_ids)
        result.pixel = PixelLevelAccumulator()
        label_runs, instance_runs, pred_runs, lengths = runs(gt_labels, gt_instances, prediction)
        result.pixel.add_runs(label_runs.astype(np.int64) & 0xFF, instance_runs.astype(np.int64),
                              pred_runs.astype(np.int64) & 0xFF, lengths, source=f"semantic result {job.semantic}",
                              gt_source=f"ground truth {image.label_ids}")
    if job.instance is not None:
        predictions = []
        for mask_path, label_id, confidence in read_instance_list(job.instance, job.instance_root):
            shape, pixels = read_mask_pixels(mask_path, what=f"instance mask (listed in {job.instance})")
            _check_shape(shape, gt_instances, "instance mask", mask_path, image.instance_ids)
            predictions.append(InstancePrediction(label_id, confidence, pixels, source=str(mask_path)))
        result.instance = InstanceAccumulator()
        result.instance.add(gt_instances, predictions, gt_source=f"ground truth {image.instance_ids}",
                            values_and_sizes=values_and_sizes)
    if job.panoptic_png is not None:
        gt_map = tables.panoptic_id[gt_instances]
        gt_segments = _gt_segments(*values_and_sizes, tables)
        try:
            pred_map = read_id_png(job.panoptic_png, packed=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {image.stem}: panoptic PNG {job.panoptic_png} not found") from None
        result.pq = image_pq_stats(gt_map, gt_segments, pred_map, [dict(s) for s in job.panoptic_segments or []],
                                   tables.categories, image_id=image.stem,
                                   gt_source=f"ground truth ({image.instance_ids})",
                                   pred_source=f"prediction ({job.panoptic_png})", low_24_bits=True)
    return result


def _run_jobs(jobs: Sequence[_ImageJob], tables: _Tables, workers: int) -> list[_ImageResult]:
    """``_score_image`` of every job, by ``workers`` threads; the first error is raised at once."""
    if workers <= 1:
        return [_score_image(job, tables) for job in jobs]
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cityscapes-eval")
    try:
        futures = [executor.submit(_score_image, job, tables) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# A results folder
# --------------------------------------------------------------------------------------------
def _panoptic_annotations(layout: ResultsLayout, images: Sequence[GroundTruthImage]) -> list[dict[str, Any]]:
    data = load_panoptic_json(layout.panoptic_json, what="panoptic prediction JSON")
    by_stem: dict[str, dict[str, Any]] = {}
    for annotation in data["annotations"]:
        name = os.path.basename(str(annotation.get("file_name") or annotation.get("image_id")))
        stem = "_".join(os.path.splitext(name)[0].split("_")[:3])
        if stem in by_stem:
            raise UserInputError(f"{layout.panoptic_json} has two predictions for image {stem}")
        by_stem[stem] = annotation
    annotations = []
    for image in images:
        if image.stem not in by_stem:
            raise UserInputError(f"no panoptic prediction for image {image.stem} in {layout.panoptic_json}")
        annotations.append(by_stem[image.stem])
    return annotations


def _jobs(layout: ResultsLayout, images: Sequence[GroundTruthImage], parts: Sequence[str]) -> list[_ImageJob]:
    jobs = [_ImageJob(image) for image in images]
    if "semantic" in parts:
        for job, path in zip(jobs, match_files(layout.semantic, images, ".png", "semantic result")):
            job.semantic = path
    if "instance" in parts:
        for job, path in zip(jobs, match_files(layout.instance, images, ".txt", "instance result")):
            job.instance, job.instance_root = path, layout.instance
    if "panoptic" in parts:
        for job, annotation in zip(jobs, _panoptic_annotations(layout, images)):
            file_name = annotation.get("file_name")
            if not file_name:
                raise UserInputError(f"{layout.panoptic_json}: the annotation of {job.image.stem} has no file_name")
            job.panoptic_png = layout.panoptic_folder / file_name
            job.panoptic_segments = list(annotation.get("segments_info", []))
    return jobs


def evaluate_cityscapes_results(results: str | os.PathLike, cityscapes_root: str | os.PathLike,
                                split: str = "val", *, parts: Sequence[str] | None = None,
                                workers: int | None = None, limit: int | None = None,
                                layout: ResultsLayout | None = None, stems: Sequence[str] | None = None
                                ) -> dict[str, Any]:
    """Score the results folder ``results`` against ``cityscapes_root``'s ``split``.

    ``parts``: which of ``panoptic``, ``semantic``, ``instance`` to score (default: those present).
    ``workers``: threads (default: the cores this process may use). ``limit``: the first N images;
    ``stems``: only these images (``<city>_<seq>_<frame>``, each must be in the split). Returns ``metrics_from_accumulators``' dict (percentages) plus ``"parts"`` and ``"num_images"``.
    """
    images = ground_truth_images(cityscapes_root, split)
    if stems is not None:
        by_stem = {image.stem: image for image in images}
        unknown = [stem for stem in stems if stem not in by_stem]
        if unknown:
            raise UserInputError(f"images {unknown[:3]} are not in {cityscapes_root}/gtFine/{split}")
        images = [by_stem[stem] for stem in stems]
    images = images[:limit]
    layout = layout or find_results(results)
    present = layout.parts
    parts = list(parts) if parts is not None else present
    for part in parts:
        if part not in PARTS:
            raise UserInputError(f"unknown part {part!r}; expected some of {', '.join(PARTS)}")
        if part not in present:
            raise UserInputError(f"{results}: no {part} results found")
    tables = _tables()
    jobs = _jobs(layout, images, parts)
    workers = max(1, min(available_cores() if workers is None else int(workers), len(jobs)))
    pq_stats = np.zeros((len(tables.categories) + 1, 4))
    pixel = PixelLevelAccumulator() if "semantic" in parts else None
    instance = InstanceAccumulator() if "instance" in parts else None
    for result in _run_jobs(jobs, tables, workers):
        if result.pq is not None:
            pq_stats += result.pq
        if result.pixel is not None:
            pixel.confusion += result.pixel.confusion
            pixel.instances += result.pixel.instances
        if result.instance is not None:
            instance.merge_records(result.instance.records())
    log.debug("cityscapes-eval: %d images, %s, %d threads", len(jobs), parts, workers)
    pq = average_pq(pq_stats, tables.categories) if "panoptic" in parts else None
    metrics = metrics_from_results(pq=pq, pixel=pixel.compute() if pixel else None,
                                   instance=instance.compute() if instance else None)
    metrics.update(parts=parts, num_images=len(jobs))
    return metrics


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * value


def metrics_from_results(*, pq: Mapping[str, Any] | None = None, pixel: Mapping[str, Any] | None = None,
                         instance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics-file form (percentages; None where a score is undefined)::

        {"pq", "sq", "rq", "pq_things", ..., "miou", "iiou", "category_miou", "category_iiou", "ap", "ap50",
         "per_class": {"<labelId>": {"name", "isthing", "pq", "sq", "rq", "iou", "iiou", "ap", "ap50"}},
         "per_category": {name: {"iou", "iiou"}}}
    """
    labels = cityscapes_labels()
    metrics: dict[str, Any] = {}
    per_class: dict[str, dict[str, Any]] = {
        str(i): {"name": labels.names[i], "isthing": i in labels.instance_classes} for i in labels.scored_ids}
    if pq is not None:
        for name, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
            for key in ("pq", "sq", "rq"):
                metrics[key + suffix] = 100.0 * pq[name][key]
            metrics["n" + suffix] = pq[name]["n"]
        for key, values in pq["per_class"].items():
            per_class[str(key)].update({m: 100.0 * values[m] for m in ("pq", "sq", "rq")})
    if pixel is not None:
        metrics.update(miou=_percent(pixel["miou"]), iiou=_percent(pixel["iiou"]),
                       category_miou=_percent(pixel["category_miou"]),
                       category_iiou=_percent(pixel["category_iiou_mean"]))
        by_name = {labels.names[i]: str(i) for i in labels.scored_ids}
        for name, value in pixel["class_iou"].items():
            per_class[by_name[name]]["iou"] = _percent(value)
        for name, value in pixel["class_iiou"].items():
            per_class[by_name[name]]["iiou"] = _percent(value)
        metrics["per_category"] = {c: {"iou": _percent(v), "iiou": _percent(pixel["category_iiou"][c])
                                       if c in pixel["category_iiou"] else None}
                                   for c, v in pixel["category_iou"].items()}
    if instance is not None:
        metrics.update(ap=_percent(instance["ap"]), ap50=_percent(instance["ap50"]))
        by_name = {labels.names[i]: str(i) for i in labels.scored_ids}
        for name, values in instance["per_class"].items():
            per_class[by_name[name]].update(ap=_percent(values["ap"]), ap50=_percent(values["ap50"]))
    metrics["per_class"] = per_class
    return metrics


_COLUMNS = (("pq", "PQ"), ("sq", "SQ"), ("rq", "RQ"), ("iou", "IoU"), ("iiou", "iIoU"), ("ap", "AP"), ("ap50", "AP50"))


def format_cityscapes_table(metrics: Mapping[str, Any]) -> str:
    """One table: a row per class (the columns of the parts scored), then the averages."""
    per_class = metrics["per_class"]
    columns = [(key, title) for key, title in _COLUMNS
               if any(key in entry for entry in per_class.values())]

    def cell(value: Any) -> str:
        return f"{value:6.1f}" if isinstance(value, (int, float)) and value is not None else f"{'-':>6s}"

    lines = [f"{'class':15s}|" + "".join(f"{title:>7s}" for _, title in columns)]
    lines.append("-" * len(lines[0]))
    for entry in per_class.values():
        lines.append(f"{entry['name']:15s}|" + "".join(" " + cell(entry.get(key)) for key, _ in columns))
    lines.append("-" * len(lines[0]))
    summary = [("PQ", "pq"), ("PQ things", "pq_things"), ("PQ stuff", "pq_stuff"), ("SQ", "sq"), ("RQ", "rq"),
               ("mIoU (classes)", "miou"), ("iIoU (classes)", "iiou"), ("IoU (categories)", "category_miou"),
               ("iIoU (categories)", "category_iiou"), ("AP", "ap"), ("AP50", "ap50")]
    for title, key in summary:
        if key in metrics:
            lines.append(f"{title:18s} {cell(metrics[key])}")
    return "\n".join(lines)
