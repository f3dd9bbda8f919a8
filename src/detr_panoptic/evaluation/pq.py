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

Per image, the two id maps are cut into runs of equal (ground truth, prediction) pixels in raster
order (panoptic maps are piecewise constant: a few runs per row); only the run values are relabelled to
compact indices, and one weighted ``np.bincount`` gives every overlap. Matching is then a few
operations on a small [G, P] matrix. Images are spread over a pool of threads (the PNG decoding,
most of the time, releases the GIL).
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from detr_panoptic.evaluation.panoptic_format import (
    MAX_SEGMENT_ID,
    _describe,
    _to_numpy,
    category_records,
    load_panoptic_json,
    read_id_png,
)
from detr_panoptic.utils.errors import UserInputError
from detr_panoptic.utils.parallel import available_cores

log = logging.getLogger(__name__)

# Columns of the per-category statistics array: summed IoU of true positives, TP, FP, FN.
IOU, TP, FP, FN = range(4)


# --------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------
class CategoryTable:
    """Category records in their given order, with id -> row index (unknown ids -> the last row)."""

    def __init__(self, categories: Any) -> None:
        records = category_records(categories)
        self.records: list[dict[str, Any]] = records
        self.ids = np.array([int(r["id"]) for r in records], dtype=np.int64)
        if len(set(self.ids.tolist())) != len(records):
            raise UserInputError(f"duplicate category ids in {self.ids.tolist()}")
        self.isthing = np.array([r.get("isthing", 0) == 1 for r in records], dtype=bool)
        self.names = [str(r.get("name", r["id"])) for r in records]
        self.index = {int(cid): i for i, cid in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, category_ids: Sequence[int]) -> np.ndarray:
        """Row index per category id; ``len(self)`` (a discard row) for unknown ids."""
        unknown = len(self.records)
        return np.array([self.index.get(int(c), unknown) for c in category_ids], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------
def _segment_table(segments: Iterable[Mapping[str, Any]], image_id: Any, source: str
                   ) -> tuple[list[dict[str, Any]], np.ndarray]:
    segments = list(segments)
    try:
        ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
        for s in segments:
            s["category_id"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"image {image_id!r}: {source}: every segment needs 'id' and 'category_id' "
                             f"({exc!r})") from None
    if (ids == 0).any():
        raise UserInputError(f"image {image_id!r}: {source}: segment id 0 is reserved for VOID")
    if len(set(ids.tolist())) != len(ids):  # not np.unique: its first call imports numpy.ma (~10 ms)
        values, counts = np.unique(ids, return_counts=True)
        raise UserInputError(f"image {image_id!r}: {source}: duplicate segment ids {values[counts > 1].tolist()}")
    return segments, ids


# Largest id + 1 for which _labels looks ids up in a table (256 KiB) rather than by binary search:
# Cityscapes ids (class * 1000 + instance) and our predictions' 1..N fit; random COCO colours do not.
_LABEL_TABLE_SIZE = 1 << 16


def _labels(values: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Compact labels of ``values``: 0 = an id not in ``segment_ids``, 1 = VOID (id 0), 2 + i = ``segment_ids[i]``."""
    keys = np.concatenate([[0], segment_ids]).astype(np.int64)
    top = max(int(values.max()), int(keys.max())) if values.size else -1
    if 0 <= top < _LABEL_TABLE_SIZE and values.min() >= 0:
        table = np.zeros(top + 1, dtype=np.int64)
        table[keys] = np.arange(1, len(keys) + 1)
        return table[values]
    sorter = np.argsort(keys, kind="stable")
    sorted_keys = keys[sorter]
    pos = np.minimum(np.searchsorted(sorted_keys, values), len(keys) - 1)
    return np.where(sorted_keys[pos] == values, sorter[pos] + 1, 0)


# Pixels per block in runs: two uint32 slices and two bool masks stay in the L2 cache, where the
# whole-image passes were bound by memory bandwidth (2x slower on 2048x1024 maps).
_RUN_BLOCK = 1 << 16


def runs(*maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Runs of equal pixels of all ``maps`` together (same shape) in raster order: the value of each
    map per run, then the run lengths (int64).

    Panoptic and label maps are piecewise constant, so there are far fewer runs than pixels and
    everything after this step (relabelling, counting) works on the runs.
    """
    flat = [m.reshape(-1) for m in maps]
    n = flat[0].size
    if n == 0:
        return (*(m[:0] for m in flat), np.zeros(0, np.int64))
    changed = np.empty(min(n, _RUN_BLOCK), dtype=bool)
    other = np.empty_like(changed)
    starts = [np.zeros(1, dtype=np.intp)]
    for begin in range(1, n, _RUN_BLOCK):
        end = min(n, begin + _RUN_BLOCK)
        block, other_block = changed[:end - begin], other[:end - begin]
        np.not_equal(flat[0][begin:end], flat[0][begin - 1:end - 1], out=block)
        for m in flat[1:]:
            np.not_equal(m[begin:end], m[begin - 1:end - 1], out=other_block)
            np.bitwise_or(block, other_block, out=block)
        block_starts = np.flatnonzero(block)
        block_starts += begin
        starts.append(block_starts)
    run_starts = np.concatenate(starts)
    lengths = np.diff(run_starts, append=n)
    return (*(m[run_starts] for m in flat), lengths)


def image_pq_stats(gt_id_map: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
                   pred_id_map: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
                   categories: CategoryTable, *, image_id: Any = None,
                   gt_source: str = "ground truth", pred_source: str = "prediction",
                   low_24_bits: bool = False) -> np.ndarray:
    """Statistics of one image: float64 ``[C + 1, 4]`` (summed IoU, TP, FP, FN per category row;
    the last row collects ground truth of categories not in ``categories``, as panopticapi ignores it).

    ``low_24_bits``: the maps hold the ids in their low 24 bits only (``read_id_png(packed=True)``).
    """
    if gt_id_map.shape != pred_id_map.shape:
        raise UserInputError(f"image {image_id!r}: {pred_source} is {pred_id_map.shape[1]}x"
                             f"{pred_id_map.shape[0]} but {gt_source} is {gt_id_map.shape[1]}x"
                             f"{gt_id_map.shape[0]} (width x height)")
    gt_segments, gt_ids = _segment_table(gt_segments, image_id, gt_source)
    pred_segments, pred_ids = _segment_table(pred_segments, image_id, pred_source)
    num_gt, num_pred = len(gt_ids), len(pred_ids)

    gt_values, pred_values, lengths = runs(gt_id_map, pred_id_map)
    gt_values = gt_values.astype(np.int64)
    pred_values = pred_values.astype(np.int64)
    if low_24_bits:
        gt_values &= MAX_SEGMENT_ID
        pred_values &= MAX_SEGMENT_ID
    pred_labels = _labels(pred_values, pred_ids)
    width = num_pred + 2
    combined = _labels(gt_values, gt_ids) * width + pred_labels
    overlap = np.bincount(combined, weights=lengths, minlength=(num_gt + 2) * width)
    overlap = overlap.astype(np.int64).reshape(num_gt + 2, width)

    # Prediction sanity checks, as panopticapi (ids in the PNG vs the JSON, known categories).
    if overlap[:, 0].any():
        stray = np.unique(pred_values[pred_labels == 0]).tolist()
        raise UserInputError(f"image {image_id!r}: segment ids {stray} are in {pred_source} PNG but not "
                             "in its JSON segments_info")
    pred_area = overlap[:, 2:].sum(0)
    pred_categories = np.array([int(s["category_id"]) for s in pred_segments], dtype=np.int64)
    pred_rows = categories.rows(pred_categories)
    unknown = pred_rows == len(categories)
    if unknown.any():
        pairs = ", ".join(f"segment {i} -> {c}" for i, c in zip(pred_ids[unknown], pred_categories[unknown]))
        raise UserInputError(f"image {image_id!r}: {pred_source} has unknown category ids ({pairs}); "
                             f"known: {categories.ids.tolist()}")
    absent = pred_area == 0
    if absent.any():
        raise UserInputError(f"image {image_id!r}: segment ids {pred_ids[absent].tolist()} are in "
                             f"{pred_source} JSON segments_info but not in its PNG")

    gt_categories = np.array([int(s["category_id"]) for s in gt_segments], dtype=np.int64)
    gt_rows = categories.rows(gt_categories)
    gt_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt_segments], dtype=bool)
    counted_gt_area = overlap[2:, :].sum(1)
    gt_area = np.array([float(s["area"]) if "area" in s else counted_gt_area[i]
                        for i, s in enumerate(gt_segments)], dtype=np.float64)

    stats = np.zeros((len(categories) + 1, 4), dtype=np.float64)
    intersection = overlap[2:, 2:]
    pred_on_void = overlap[1, 2:]
    candidate = ((intersection > 0) & (gt_categories[:, None] == pred_categories[None, :])
                 & ~gt_crowd[:, None])
    union = pred_area[None, :] + gt_area[:, None] - intersection - pred_on_void[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(candidate, intersection / union, 0.0)
    matched = candidate & (iou > 0.5)
    gt_index, pred_index = np.nonzero(matched)
    rows = gt_rows[gt_index]
    np.add.at(stats[:, IOU], rows, iou[gt_index, pred_index])
    np.add.at(stats[:, TP], rows, 1)
    gt_matched = matched.any(1)
    pred_matched = matched.any(0)
    np.add.at(stats[:, FN], gt_rows[~gt_matched & ~gt_crowd], 1)

    # Unmatched predictions mostly on VOID + same-category crowd are not false positives.
    ignored = pred_on_void.astype(np.float64)
    crowd_of_category: dict[int, int] = {}
    for i in np.flatnonzero(gt_crowd).tolist():
        crowd_of_category[int(gt_categories[i])] = i  # the last crowd segment listed wins
    for j in np.flatnonzero(~pred_matched).tolist():
        crowd = crowd_of_category.get(int(pred_categories[j]))
        if crowd is not None:
            ignored[j] += intersection[crowd, j]
    false_positive = ~pred_matched & ~(ignored / pred_area > 0.5)
    np.add.at(stats[:, FP], pred_rows[false_positive], 1)
    return stats


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
        gt = _to_numpy(gt_id_map)
        pred = _to_numpy(pred_id_map)
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
        state = _to_numpy(state).astype(np.float64)
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
        raise UserInputError(f"ground-truth JSON {_describe(gt_json)} has no 'categories'")
    categories = CategoryTable(gt["categories"])
    gt_dir = _folder(gt_folder, gt_json, "ground-truth")
    pred_dir = _folder(pred_folder, pred_json, "prediction")
    pairs = match_annotations(gt, pred, pred_source=f"prediction JSON {_describe(pred_json)}")

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
