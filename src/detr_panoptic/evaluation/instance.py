"""Cityscapes' instance-level benchmark: AP and AP50 of scored instance masks, exactly as
cityscapesScripts' ``evalInstanceLevelSemanticLabeling`` computes them.

Rules, per class with instances (person, rider, car, truck, bus, train, motorcycle, bicycle) and per
overlap threshold t in 0.50, 0.55, ..., 0.95 (``np.arange(0.5, 1, 0.05)``):

* Ground truth: the image's instanceIds values ``v >= 1000`` of the class (``v // 1000``) with at least
  100 pixels. The class's crowd region (``v`` = the labelId) and smaller instances are not counted
  but may absorb predictions (below).
* A prediction (a mask of non-zero pixels, a labelId, a confidence; empty masks and other labels are
  dropped) matches a ground-truth instance of its class when IoU = intersection / (gt pixels +
  predicted pixels - intersection) > t. A matched instance is a true positive scored by the highest
  confidence among its matches; its other matches are false positives; an unmatched one is a false
  negative.
* A prediction that matches nothing (not even a crowd region or a small instance) is a false
  positive unless its pixels on ignored labels (``ignoreInEval``: void, the ``*group`` regions, caravan,
  trailer), on crowd regions of its class and on too-small instances of its class, over its pixel
  count, exceed t.
* AP per class and threshold: precision averaged over the recall steps of the ranked list (the
  reference's trapezoid-like rule, reproduced operation for operation); a class with ground truth but
  no prediction scores 0, one without ground truth is undefined (NaN). ``ap`` is the mean over classes
  and thresholds of the defined values, ``ap50`` that at t = 0.5.

Deviation: where every ground-truth instance of a class is missed and every prediction of it is
ignored, the reference fails (an empty ranked list); we score 0. AP 50m / 100m need per-instance
distances, which Cityscapes' public ground truth does not have (the reference gives NaN for them).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detr_panoptic.evaluation.pq_stats import runs
from detr_panoptic.evaluation.semantic import NUM_LABEL_IDS, cityscapes_labels
from detr_panoptic.utils.errors import UserInputError

OVERLAPS = np.arange(0.5, 1.0, 0.05)
MIN_REGION_SIZE = 100
_INSTANCE_TABLE = 1 << 16  # instanceIds are uint16


@dataclass
class InstancePrediction:
    """One predicted instance: the labelId, its confidence and its pixels (flat indices into the image)."""

    label_id: int
    confidence: float
    pixels: np.ndarray
    source: str = "prediction"


@dataclass
class _ClassImage:
    """One image's contribution to one class, per overlap threshold: the ranked entries (1 = true
    positive, 0 = false positive) with their scores, and the missed ground truth."""

    trues: list[np.ndarray]
    scores: list[np.ndarray]
    hard_fns: np.ndarray   # [T]
    have_gt: bool
    have_pred: bool


class InstanceAccumulator:
    """Cityscapes AP statistics, image by image. ``records()`` / ``merge_records``: the state as plain
    lists (gather them across processes with ``all_gather_object``)."""

    def __init__(self) -> None:
        labels = cityscapes_labels()
        self.classes = list(labels.instance_classes)
        self.names = [labels.names[c] for c in self.classes]
        self._ignored = ~labels.scored
        self.per_class: dict[int, list[_ClassImage]] = {c: [] for c in self.classes}
        self.num_images = 0

    def add(self, gt_instances: np.ndarray, predictions: Sequence[InstancePrediction], *,
            gt_source: str = "ground truth", values_and_sizes: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """One image: the ground-truth instanceIds ``[H, W]`` (uint16) and its predictions.
        ``values_and_sizes``: the map's distinct values and their pixel counts, when already known."""
        flat = gt_instances.reshape(-1)
        values, sizes = values_and_sizes if values_and_sizes is not None else value_counts(flat)
        label_of = np.where(values < 1000, values, values // 1000)
        if label_of.size and int(label_of.max()) >= NUM_LABEL_IDS:
            raise UserInputError(f"{gt_source}: values {values[label_of >= NUM_LABEL_IDS].tolist()} name no "
                                 "Cityscapes label")
        instance_class = np.isin(label_of, self.classes)
        # Compact index per instanceIds value: 0 other, 1 ignored label (void), 2 + k: k-th instance-class value.
        table = np.zeros(_INSTANCE_TABLE, np.int64)
        void_values = values[(values < 1000) & self._ignored[np.minimum(label_of, NUM_LABEL_IDS - 1)]]
        table[void_values] = 1
        members = np.flatnonzero(instance_class)
        table[values[members]] = 2 + np.arange(members.size)
        by_class: dict[int, list[InstancePrediction]] = {c: [] for c in self.classes}
        for prediction in predictions:
            if prediction.label_id in by_class and prediction.pixels.size:
                by_class[prediction.label_id].append(prediction)
        counts = {}
        for class_predictions in by_class.values():
            for prediction in class_predictions:
                if int(prediction.pixels.max()) >= flat.size:
                    raise UserInputError(f"{prediction.source}: the mask is larger than the image")
                counts[id(prediction)] = np.bincount(table[flat[prediction.pixels]], minlength=members.size + 2)
        for label_id in self.classes:
            rows = np.flatnonzero(label_of[members] == label_id)
            class_predictions = by_class[label_id]
            intersection = np.zeros((rows.size, len(class_predictions)), np.int64)
            for column, prediction in enumerate(class_predictions):
                intersection[:, column] = counts[id(prediction)][2 + rows]
            self.per_class[label_id].append(_class_image(
                values[members[rows]], sizes[members[rows]].astype(np.int64), intersection,
                np.array([p.confidence for p in class_predictions], np.float64),
                np.array([p.pixels.size for p in class_predictions], np.int64),
                np.array([counts[id(p)][1] for p in class_predictions], np.int64)))
        self.num_images += 1

    def records(self) -> dict[int, list[_ClassImage]]:
        return self.per_class

    def merge_records(self, records: dict[int, list[_ClassImage]]) -> None:
        for label_id, images in records.items():
            self.per_class[int(label_id)].extend(images)

    def ap_matrix(self) -> np.ndarray:
        """``[classes, thresholds]`` AP (NaN where the class has no ground truth)."""
        matrix = np.zeros((len(self.classes), len(OVERLAPS)), np.float64)
        for row, label_id in enumerate(self.classes):
            images = self.per_class[label_id]
            have_gt = any(i.have_gt for i in images)
            have_pred = any(i.have_pred for i in images)
            for t in range(len(OVERLAPS)):
                if not have_gt:
                    matrix[row, t] = math.nan
                elif not have_pred:
                    matrix[row, t] = 0.0
                else:
                    trues = np.concatenate([i.trues[t] for i in images])
                    scores = np.concatenate([i.scores[t] for i in images])
                    matrix[row, t] = average_precision(trues, scores, int(sum(i.hard_fns[t] for i in images)))
        return matrix

    def compute(self) -> dict[str, Any]:
        """Fractions: ``{"ap", "ap50", "per_class": {name: {"ap", "ap50"}}, "ap_matrix"}``."""
        matrix = self.ap_matrix()
        o50 = np.flatnonzero(np.isclose(OVERLAPS, 0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN means: no class has ground truth
            ap = float(np.nanmean(matrix))
            ap50 = float(np.nanmean(matrix[:, o50]))
        per_class = {name: {"ap": float(np.average(matrix[row])), "ap50": float(np.average(matrix[row, o50]))}
                     for row, name in enumerate(self.names)}
        return {"ap": ap, "ap50": ap50, "per_class": per_class, "ap_matrix": matrix.tolist()}


def value_counts(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of an id map (ascending, int64) and their pixel counts, counted on its runs."""
    run_values, lengths = runs(id_map)
    values, inverse = np.unique(run_values.astype(np.int64), return_inverse=True)
    return values, np.bincount(inverse, weights=lengths, minlength=values.size).astype(np.int64)


def _class_image(gt_ids: np.ndarray, gt_sizes: np.ndarray, intersection: np.ndarray, confidence: np.ndarray,
                 pred_sizes: np.ndarray, pred_void: np.ndarray) -> _ClassImage:
    """One class of one image: ``intersection [G, P]`` between its ground-truth values (crowd region
    and small instances included) and its predictions."""
    valid = (gt_ids >= 1000) & (gt_sizes >= MIN_REGION_SIZE)
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = intersection / (gt_sizes[:, None] + pred_sizes[None, :] - intersection)
    # Pixels that do not make an unmatched prediction a false positive: ignored labels, the class's
    # crowd region, too-small instances (a small crowd region counts twice, as in the reference).
    absorbed = (pred_void + intersection[gt_ids < 1000].sum(0)
                + intersection[gt_sizes < MIN_REGION_SIZE].sum(0)).astype(np.float64)
    trues, scores, hard_fns = [], [], np.zeros(len(OVERLAPS), np.int64)
    for t, threshold in enumerate(OVERLAPS):
        matches = (intersection > 0) & (overlap > threshold)
        valid_matches = matches[valid]
        matched = valid_matches.any(1)
        hard_fns[t] = int((~matched).sum())
        ranked = np.where(valid_matches, confidence[None, :], -np.inf)
        best = ranked.argmax(1) if ranked.size else np.zeros(len(ranked), np.int64)
        duplicates = valid_matches.copy()
        duplicates[np.flatnonzero(matched), best[matched]] = False
        found = matches.any(0)
        false_positive = ~found & (absorbed / pred_sizes <= threshold)
        tp_scores = confidence[best[matched]]
        fp_scores = np.concatenate([confidence[np.nonzero(duplicates)[1]], confidence[false_positive]])
        trues.append(np.concatenate([np.ones(tp_scores.size), np.zeros(fp_scores.size)]))
        scores.append(np.concatenate([tp_scores, fp_scores]))
    return _ClassImage(trues, scores, hard_fns, bool(valid.any()), bool(pred_sizes.size))


def average_precision(trues: np.ndarray, scores: np.ndarray, hard_fns: int) -> float:
    """The reference's AP of a ranked list: ``trues`` (1 true positive, 0 false positive) with their
    ``scores``, plus ``hard_fns`` missed instances."""
    if trues.size == 0:
        return 0.0
    order = np.argsort(scores)
    true_sorted = trues[order]
    cumulative = np.cumsum(true_sorted)
    _, first = np.unique(scores[order], return_index=True)
    count = len(true_sorted)
    total_true = cumulative[-1]
    before = np.append(cumulative, 0)[first - 1]  # trues ranked below each distinct score
    tp = total_true - before
    fp = count - first - tp
    fn = before + hard_fns
    precision = np.zeros(len(first) + 1)
    recall = np.zeros(len(first) + 1)
    precision[:-1] = tp / (tp + fp)
    recall[:-1] = tp / (tp + fn)
    precision[-1] = 1.0
    recall[-1] = 0.0
    padded = np.concatenate([recall[:1], recall, [0.0]])
    steps = np.convolve(padded, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, steps))
