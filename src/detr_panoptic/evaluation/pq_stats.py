"""One image's panoptic-quality statistics, exactly as panopticapi counts them (the rules: ``evaluation.pq``).

The two id maps are cut into runs of equal (ground truth, prediction) pixels in raster order (panoptic maps
are piecewise constant: a few runs per row); only the run values are relabelled to compact indices, and one
weighted ``np.bincount`` gives every overlap. Matching is then a few operations on a small [G, P] matrix.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from detr_panoptic.evaluation.panoptic_format import MAX_SEGMENT_ID, category_records
from detr_panoptic.utils.errors import UserInputError

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

    pred_area, pred_categories, pred_rows = _checked_predictions(overlap, pred_values, pred_labels, pred_ids,
                                                                 pred_segments, categories, image_id, pred_source)
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

    false_positive = _false_positives(pred_matched, pred_on_void, pred_area, pred_categories, gt_crowd,
                                      gt_categories, intersection)
    np.add.at(stats[:, FP], pred_rows[false_positive], 1)
    return stats


def _checked_predictions(overlap: np.ndarray, pred_values: np.ndarray, pred_labels: np.ndarray,
                         pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
                         categories: CategoryTable, image_id: Any, pred_source: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction sanity checks, as panopticapi (ids in the PNG vs the JSON, known categories); returns
    the predicted segments' areas, category ids and category rows."""
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
    return pred_area, pred_categories, pred_rows


def _false_positives(pred_matched: np.ndarray, pred_on_void: np.ndarray, pred_area: np.ndarray,
                     pred_categories: np.ndarray, gt_crowd: np.ndarray, gt_categories: np.ndarray,
                     intersection: np.ndarray) -> np.ndarray:
    """Bool [P]: unmatched predictions, except those mostly on VOID + the same category's crowd."""
    ignored = pred_on_void.astype(np.float64)
    crowd_of_category: dict[int, int] = {}
    for i in np.flatnonzero(gt_crowd).tolist():
        crowd_of_category[int(gt_categories[i])] = i  # the last crowd segment listed wins
    for j in np.flatnonzero(~pred_matched).tolist():
        crowd = crowd_of_category.get(int(pred_categories[j]))
        if crowd is not None:
            ignored[j] += intersection[crowd, j]
    return ~pred_matched & ~(ignored / pred_area > 0.5)
