"""Panoptic quality, computed exactly as panopticapi's ``pq_compute`` computes it, but vectorised.

Rules (per image, per category):

* Ground-truth pixels with id 0 are VOID. A predicted and a ground-truth segment of the same
  category match when IoU > 0.5, where the union leaves out the predicted pixels that fall on VOID.
  Crowd ground-truth segments (``iscrowd == 1``) are never matched.
* Unmatched non-crowd ground truth is a false negative. An unmatched prediction is a false positive
  unless more than half of its pixels lie on VOID plus the (last listed) crowd segment of its
  category.
* Ground-truth areas come from the JSON's ``area`` (panopticapi's choice; counted from the PNG
  when missing); predicted areas are counted from the PNG.
* Per category: PQ = sum IoU(TP) / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  All/Things/Stuff average over the categories with TP + FP + FN > 0.

The result dict has panopticapi's structure, as fractions::

    {"All": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq"}},
     "Things": {...}, "Stuff": {...}}

``per_class`` covers every category (0.0 for those never seen), like panopticapi's. Deviations,
only where panopticapi would crash or silently accept broken input: with no category seen, the
averages are 0.0 with ``n = 0`` (panopticapi divides by zero); segment id 0 or a duplicate segment
id in a JSON, and a prediction for an image that has two predictions, are errors.

Per image (``evaluation.pq_stats.image_pq_stats``), the two id maps are cut into runs of equal (ground
truth, prediction) pixels; one weighted ``np.bincount`` gives every overlap. Images are spread over a pool
of threads (the PNG decoding, most of the time, releases the GIL).
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.evaluation.panoptic_format import (
    describe_source,
    load_panoptic_json,
    read_id_png,
    to_numpy,
)
from detr_panoptic.evaluation.pq_stats import CategoryTable, image_pq_stats, runs
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.parallel import available_cores

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Averages
# --------------------------------------------------------------------------------------------
def average_pq(stats: np.ndarray, categories: CategoryTable) -> dict[str, Any]:
    """panopticapi's ``average_pq`` from ``[C, 4]`` statistics (same order of summation)."""
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[int, dict[str, float]] = {}
        for row, category_id in enumerate(categories.ids.tolist()):
            if isthing is not None and bool(categories.isthing[row]) != isthing:
                continue
            iou, tp, fp, fn = (float(v) for v in stats[row])
            if tp + fp + fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[category_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n:
            results[name] = {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}
        else:
            results[name] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        if name == "All":
            results["per_class"] = per_class
    return results


# --------------------------------------------------------------------------------------------
# In-memory API
# --------------------------------------------------------------------------------------------
class PQAccumulator:
    """Accumulate PQ statistics image by image from id maps in memory (no PNGs).

    ``categories``: a ``CategoryMap``, ``Category`` objects, COCO category dicts or ``{id: record}``;
    their order is the order of ``per_class`` and of the state rows.

    The state is a float64 ``[C, 4]`` array (summed IoU, TP, FP, FN per category) and is additive:
    across processes, ``all_reduce(SUM)`` the ``to_tensor()`` of each and ``load_tensor`` the sum, or
    ``merge`` accumulators directly.
    """

    def __init__(self, categories: Any) -> None:
        self.categories = categories if isinstance(categories, CategoryTable) else CategoryTable(categories)
        self.stats = np.zeros((len(self.categories) + 1, 4), dtype=np.float64)
        self.num_images = 0

    def add(self, gt_id_map: Any, gt_segments: Sequence[Mapping[str, Any]], pred_id_map: Any,
            pred_segments: Sequence[Mapping[str, Any]], *, image_id: Any = None) -> None:
        """Add one image. Id maps are ``[H, W]`` integer arrays (numpy or torch, any device), 0 = VOID.

        ``gt_segments``: dicts with ``id``, ``category_id``, optional ``iscrowd`` and ``area`` (counted
        from ``gt_id_map`` when missing). ``pred_segments``: dicts with ``id`` and ``category_id``.
        """
        gt = to_numpy(gt_id_map)
        pred = to_numpy(pred_id_map)
        for name, array in (("ground-truth", gt), ("predicted", pred)):
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise UserInputError(f"image {image_id!r}: the {name} id map must be an [H, W] integer "
                                     f"array, got {array.dtype} {array.shape}")
        self.stats += image_pq_stats(gt, [dict(s) for s in gt_segments], pred,
                                     [dict(s) for s in pred_segments], self.categories, image_id=image_id)
        self.num_images += 1

    def merge(self, other: PQAccumulator) -> PQAccumulator:
        """Add another accumulator's statistics (same categories) into this one; returns self."""
        if other.categories.ids.tolist() != self.categories.ids.tolist():
            raise UserInputError("cannot merge PQ accumulators with different categories")
        self.stats += other.stats
        self.num_images += other.num_images
        return self

    def state(self) -> np.ndarray:
        """float64 ``[C, 4]``: summed IoU, TP, FP, FN per category (a copy)."""
        return self.stats[:-1].copy()

    def load_state(self, state: Any) -> None:
        state = to_numpy(state).astype(np.float64)
        if state.shape != (len(self.categories), 4):
            raise UserInputError(f"expected a PQ state of shape {(len(self.categories), 4)}, got {state.shape}")
        self.stats[:-1] = state
        self.stats[-1] = 0

    def to_tensor(self, device: Any = None) -> Any:
        """The state as a float64 torch tensor ``[C, 4]`` (sum-reducible across processes)."""
        import torch

        return torch.as_tensor(self.state(), dtype=torch.float64, device=device)

    def load_tensor(self, tensor: Any) -> None:
        self.load_state(tensor)

    @classmethod
    def from_tensor(cls, categories: Any, tensor: Any) -> PQAccumulator:
        accumulator = cls(categories)
        accumulator.load_state(tensor)
        return accumulator

    def compute(self) -> dict[str, Any]:
        """panopticapi's result dict (fractions); see the module docstring."""
        return average_pq(self.stats, self.categories)

    def counts(self) -> dict[int, dict[str, float]]:
        """Per category id: ``{"iou", "tp", "fp", "fn"}`` (extra detail panopticapi does not return)."""
        return {cid: dict(zip(("iou", "tp", "fp", "fn"), (float(v) for v in self.stats[row])))
                for row, cid in enumerate(self.categories.ids.tolist())}


# --------------------------------------------------------------------------------------------
# File API
# --------------------------------------------------------------------------------------------
def _read_png(folder: str, annotation: Mapping[str, Any], what: str, out: np.ndarray | None = None
              ) -> tuple[np.ndarray, str]:
    image_id = annotation.get("image_id")
    file_name = annotation.get("file_name")
    if not file_name:
        raise UserInputError(f"image {image_id!r}: the {what} annotation has no 'file_name'")
    path = os.path.join(folder, file_name)
    try:
        return read_id_png(path, packed=True, out=out), path
    except FileNotFoundError:
        raise FileNotFoundError(f"image {image_id!r}: {what} PNG {path} not found") from None


class _Buffers(threading.local):
    """Per thread: the arrays the previous image was decoded into (see ``decode_rgb_png``'s ``out``).

    Reusing them spares allocating and page-faulting 2 x 8 MB per 2048x1024 image."""

    gt: np.ndarray | None = None
    pred: np.ndarray | None = None


def _pair_stats(pair: tuple[Mapping[str, Any], Mapping[str, Any]], gt_folder: str, pred_folder: str,
                categories: CategoryTable, buffers: _Buffers) -> np.ndarray:
    gt_annotation, pred_annotation = pair
    gt_map, gt_path = _read_png(gt_folder, gt_annotation, "ground-truth", out=buffers.gt)
    pred_map, pred_path = _read_png(pred_folder, pred_annotation, "predicted", out=buffers.pred)
    if gt_map.flags.writeable:  # decoded into a buffer of ours (not a read-only view of Pillow's memory)
        buffers.gt = gt_map
    if pred_map.flags.writeable:
        buffers.pred = pred_map
    return image_pq_stats(
        gt_map, [dict(s) for s in gt_annotation.get("segments_info", [])],
        pred_map, [dict(s) for s in pred_annotation.get("segments_info", [])],
        categories, image_id=gt_annotation["image_id"],
        gt_source=f"ground truth ({gt_path})", pred_source=f"prediction ({pred_path})", low_24_bits=True)


def _pairs_stats(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], gt_folder: str,
                 pred_folder: str, categories: CategoryTable) -> np.ndarray:
    """Statistics of all ``pairs``, one after the other in this thread."""
    total = np.zeros((len(categories) + 1, 4), dtype=np.float64)
    buffers = _Buffers()
    for pair in pairs:
        total += _pair_stats(pair, gt_folder, pred_folder, categories, buffers)
    return total


def _threaded_stats(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], workers: int,
                    gt_folder: str, pred_folder: str, categories: CategoryTable) -> np.ndarray:
    """Statistics of all ``pairs`` by a pool of ``workers`` threads, one image per task.

    Threads, not processes: the PNG reading, inflating (zlib-ng) and unfiltering (our C extension)
    release the GIL, which is most of an image's time, so threads scale about as processes do while
    nothing has to start, import or pickle anything (bench/bench_pq.py). Nothing can hang either: a
    task that raises completes its future with the error, which is raised here at once; the tasks not
    yet started are cancelled, and the running ones finish their one image. The statistics are summed
    in the order of ``pairs`` (the same float sums whatever the threads' timing).
    """
    buffers = _Buffers()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pq")
    try:
        futures = [executor.submit(_pair_stats, pair, gt_folder, pred_folder, categories, buffers)
                   for pair in pairs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()
        total = np.zeros((len(categories) + 1, 4), dtype=np.float64)
        for future in futures:
            total += future.result()
        return total
    finally:
        # On an error or Ctrl-C (KeyboardInterrupt in wait), the queued images are dropped; the
        # threads are joined after their current image (milliseconds).
        executor.shutdown(wait=True, cancel_futures=True)


# Pixels (ground truth + prediction, ~5 ms of work) below which a thread more does not pay: on small
# sets the threads mostly wait for each other's GIL-holding numpy calls. Measured (2 cores, shared):
# 4 images of 256x512 (1 M pixels) took 12.8 ms in one thread, 18.1 ms in two; 16 of them (4 M
# pixels) 47 ms vs 40 ms; 40 images of 48x64: 37 ms vs 42 ms.
MIN_PIXELS_PER_THREAD = 1 << 20


def choose_workers(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], gt_folder: str,
                   workers: int | None = None) -> int:
    """Threads for ``pairs``: ``workers`` if given (at most one per image), else one per
    ``MIN_PIXELS_PER_THREAD`` of work, at most the cores this process may use and at least 1.

    The images' size comes from the first ground-truth PNG's header (24 bytes read); a file that
    cannot be read counts as a large image (the evaluation names the file when it gets to it).
    """
    if not pairs:
        return 1
    if workers is not None:
        return max(1, min(int(workers), len(pairs)))
    pixels_per_image = 2 * _png_pixels(os.path.join(gt_folder, str(pairs[0][0].get("file_name", ""))))
    by_work = max(1, (pixels_per_image * len(pairs)) // MIN_PIXELS_PER_THREAD)
    return max(1, min(available_cores(), len(pairs), by_work))


def _png_pixels(path: str) -> int:
    """Width x height from a PNG's IHDR; ``MIN_PIXELS_PER_THREAD`` when the file does not tell."""
    try:
        with open(path, "rb") as file:
            head = file.read(24)
    except OSError:
        return MIN_PIXELS_PER_THREAD
    if len(head) < 24 or head[12:16] != b"IHDR":
        return MIN_PIXELS_PER_THREAD
    width, height = struct.unpack(">II", head[16:24])
    return width * height


def match_annotations(gt_json: Mapping[str, Any], pred_json: Mapping[str, Any], *,
                      pred_source: str = "the prediction JSON"
                      ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pair every ground-truth annotation with the prediction of the same ``image_id``."""
    predictions: dict[Any, dict[str, Any]] = {}
    for annotation in pred_json["annotations"]:
        image_id = annotation.get("image_id")
        if image_id in predictions:
            raise UserInputError(f"{pred_source} has two predictions for image {image_id!r}")
        predictions[image_id] = annotation
    pairs = []
    for annotation in gt_json["annotations"]:
        image_id = annotation.get("image_id")
        if image_id not in predictions:
            hint = ""
            as_text = {str(k): k for k in predictions}
            if str(image_id) in as_text:
                hint = (f" (there is one for {as_text[str(image_id)]!r}: image ids must have the same "
                        "type, int or str, in both files)")
            raise UserInputError(f"no prediction for image {image_id!r} "
                                 f"(file {annotation.get('file_name')!r}) in {pred_source}{hint}")
        pairs.append((annotation, predictions[image_id]))
    return pairs


def pq_compute(gt_json: str | os.PathLike | Mapping[str, Any], pred_json: str | os.PathLike | Mapping[str, Any],
               gt_folder: str | os.PathLike | None = None, pred_folder: str | os.PathLike | None = None, *,
               workers: int | None = None) -> dict[str, Any]:
    """Panoptic quality of COCO-panoptic predictions, equal to panopticapi's ``pq_compute``.

    ``gt_json``/``pred_json``: paths or loaded dicts (``{"annotations": [...]}``; the ground truth
    also needs ``categories``). Folders default to the JSON path without ``.json`` (panopticapi's
    convention). Images are paired by ``image_id`` (int or str, compared as given) and spread over
    ``workers`` threads (default: chosen from the amount of work, see ``choose_workers``; 1 or 0:
    this thread only). No processes are started, so a script may call this at module level (without
    ``if __name__ == "__main__":``).
    Returns fractions; see the module doc.
    """
    gt = load_panoptic_json(gt_json, what="ground-truth JSON")
    pred = load_panoptic_json(pred_json, what="prediction JSON")
    if not gt.get("categories"):
        raise UserInputError(f"ground-truth JSON {describe_source(gt_json)} has no 'categories'")
    categories = CategoryTable(gt["categories"])
    gt_dir = _folder(gt_folder, gt_json, "ground-truth")
    pred_dir = _folder(pred_folder, pred_json, "prediction")
    pairs = match_annotations(gt, pred, pred_source=f"prediction JSON {describe_source(pred_json)}")

    workers = choose_workers(pairs, gt_dir, workers)
    if workers == 1:
        stats = _pairs_stats(pairs, gt_dir, pred_dir, categories)
    else:
        stats = _threaded_stats(pairs, workers, gt_dir, pred_dir, categories)
    log.debug("PQ over %d images with %d threads", len(pairs), workers)
    return average_pq(stats, categories)


def _folder(folder: str | os.PathLike | None, json_source: Any, what: str) -> str:
    if folder is None:
        if isinstance(json_source, (Mapping, list)):
            raise UserInputError(f"the {what} folder is needed when the {what} JSON is given as a dict")
        folder = Path(json_source).with_suffix("")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} PNG folder {folder} not found (expected a folder of COCO panoptic PNGs)")
    return str(folder)


def format_results(results: Mapping[str, Any], categories: Any = None) -> str:
    """panopticapi-style table: per-class PQ/SQ/RQ (%) with names, then All/Things/Stuff with N."""
    names: dict[Any, str] = {}
    if categories is not None:
        table = CategoryTable(categories)
        names = {cid: name for cid, name in zip(table.ids.tolist(), table.names)}
    per_class = results.get("per_class", {})
    width = max([14] + [len(str(names.get(_key(k), k))) for k in per_class])
    lines = [f"{'Category':{width}s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}"]
    for key in sorted(per_class, key=_key):
        m = per_class[key]
        lines.append(f"{names.get(_key(key), key)!s:{width}s}| "
                     f"{100 * m['pq']:5.1f}  {100 * m['sq']:5.1f}  {100 * m['rq']:5.1f}")
    lines.append("-" * (width + 27))
    lines.append(f"{'':{width}s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}")
    for name in ("All", "Things", "Stuff"):
        m = results[name]
        lines.append(f"{name:{width}s}| {100 * m['pq']:5.1f}  {100 * m['sq']:5.1f}  {100 * m['rq']:5.1f} "
                     f"{m['n']:5d}")
    return "\n".join(lines)


def _key(key: Any) -> Any:
    try:
        return int(key)
    except (TypeError, ValueError):
        return key


def results_to_metrics(results: Mapping[str, Any], categories: Any = None, *,
                       include_fractions: bool = True) -> dict[str, Any]:
    """The metrics-file form: percentages (0..100) as in ``metrics.jsonl``, per-class names, and
    panopticapi's own result dict (fractions) under ``"panopticapi"``::

        {"pq", "sq", "rq", "n", "pq_things", ..., "n_stuff",
         "per_class": {"<id>": {"name", "isthing", "pq", "sq", "rq"}}, "panopticapi": {...}}
    """
    table = CategoryTable(categories) if categories is not None else None
    flat: dict[str, Any] = {}
    for name, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for metric in ("pq", "sq", "rq"):
            flat[metric + suffix] = 100.0 * results[name][metric]
        flat["n" + suffix] = results[name]["n"]
    per_class: dict[str, Any] = {}
    for key, values in results.get("per_class", {}).items():
        entry: dict[str, Any] = {}
        if table is not None and _key(key) in table.index:
            row = table.index[_key(key)]
            entry.update(name=table.names[row], isthing=bool(table.isthing[row]))
        entry.update({m: 100.0 * values[m] for m in ("pq", "sq", "rq")})
        per_class[str(key)] = entry
    flat["per_class"] = per_class
    if not include_fractions:
        return flat
    flat["panopticapi"] = {name: dict(results[name]) for name in ("All", "Things", "Stuff")}
    flat["panopticapi"]["per_class"] = {str(k): dict(v) for k, v in results.get("per_class", {}).items()}
    return flat


def results_to_percentages(results: Mapping[str, Any]) -> dict[str, Any]:
    """Percentages only (a ``metrics.jsonl`` val record): ``pq, sq, rq, n, pq_things, ..., per_class``."""
    return results_to_metrics(results, include_fractions=False)


# The public API (``runs``, ``CategoryTable`` and ``image_pq_stats`` live in ``evaluation.pq_stats``).
__all__ = ["CategoryTable", "PQAccumulator", "average_pq", "choose_workers", "format_results", "image_pq_stats",
           "match_annotations", "pq_compute", "results_to_metrics", "results_to_percentages", "runs"]
