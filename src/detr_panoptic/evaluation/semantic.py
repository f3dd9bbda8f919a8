"""Semantic segmentation scores: Cityscapes' pixel-level benchmark (class and category IoU and iIoU,
exactly as cityscapesScripts' ``evalPixelLevelSemanticLabeling``) and mean IoU over the categories of
any COCO-panoptic dataset.

Cityscapes rules (labelIds ``0..33``; the 19 labels without ``ignoreInEval`` are scored):

* A confusion matrix over all labelIds counts every pixel (ground truth x prediction).
* Class IoU = TP / (TP + FP + FN) with FN = the class's ground-truth pixels predicted as anything
  else (an ignored label included) and FP = pixels predicted as the class whose ground truth is
  another *scored* label (pixels on ignored ground truth are not false positives).
* iIoU (instance-level IoU) weights each ground-truth instance's (instanceIds value > 1000 of a scored
  class) TP and FN pixels by the class's average instance size over the instance's size (the fixed
  table ``AVERAGE_INSTANCE_SIZE``), FP unweighted, for the 8 classes with instances.
* Category IoU/iIoU: the same over the 7 categories (flat ... vehicle), a pixel being right when its
  predicted label is in the ground truth's category; iIoU only for ``human`` and ``vehicle``.
* Averages over the classes (categories) whose score is defined (TP + FP + FN > 0).

Where cityscapesScripts stops with an error (an unknown label value, different sizes), we raise a
``UserInputError`` naming the file.

COCO-panoptic datasets: ``category_confusion`` / ``CategoryIoU``: per category IoU = TP / (TP + FP + FN)
over the pixels whose ground truth is not VOID, mean over categories with TP + FP + FN > 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from detr_panoptic.utils.errors import UserInputError

# The average pixel count of an instance per class, from cityscapesScripts' pixel-level evaluator
# (its iIoU weights; fixed numbers of the benchmark).
AVERAGE_INSTANCE_SIZE = {
    "bicycle": 4672.3249222261, "caravan": 36771.8241758242, "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518, "bus": 35732.1511111111, "train": 67583.7075812274,
    "car": 12794.0202738185, "person": 3462.4756337644, "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
NUM_LABEL_IDS = 34  # Cityscapes labelIds 0..33 (license plate, -1, never appears in a label image)
# Columns of the instance statistics: TP, FN, weighted TP, weighted FN.
TP, FN, TP_WEIGHTED, FN_WEIGHTED = range(4)


@dataclass(frozen=True)
class CityscapesLabels:
    """cityscapesScripts' label table, as arrays indexed by labelId (0..33)."""

    names: tuple[str, ...]
    scored: np.ndarray            # bool [34]: not ignoreInEval
    category_of: tuple[str, ...]  # category name per labelId
    categories: tuple[str, ...]   # category names in the reference's order
    instance_classes: tuple[int, ...]  # labelIds with instances that are scored (person ... bicycle)
    # Categories whose labels all have instances (human, vehicle): their labelIds (ignored ones too).
    instance_categories: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def scored_ids(self) -> list[int]:
        return np.flatnonzero(self.scored).tolist()

    def category_ids(self, category: str) -> list[int]:
        """The scored labelIds of ``category``."""
        return [i for i in self.scored_ids if self.category_of[i] == category]


@lru_cache(maxsize=1)
def cityscapes_labels() -> CityscapesLabels:
    from cityscapesscripts.helpers.labels import category2labels, labels

    names = [""] * NUM_LABEL_IDS
    category_of = [""] * NUM_LABEL_IDS
    scored = np.zeros(NUM_LABEL_IDS, bool)
    instance_classes = []
    for label in labels:
        if label.id < 0:
            continue
        names[label.id] = label.name
        category_of[label.id] = label.category
        scored[label.id] = not label.ignoreInEval
        if label.hasInstances and not label.ignoreInEval:
            instance_classes.append(label.id)
    instance_categories = []
    for category, members in category2labels.items():
        members = [label for label in members if label.id >= 0]
        if members and all(label.hasInstances for label in members):
            instance_categories.append((category, tuple(label.id for label in members)))
    return CityscapesLabels(tuple(names), scored, tuple(category_of), tuple(category2labels),
                            tuple(instance_classes), tuple(instance_categories))


def _ratio(tp: float, fp: float, fn: float) -> float:
    denominator = tp + fp + fn
    return float(tp) / float(denominator) if denominator != 0 else math.nan


def _mean(scores: Mapping[str, float]) -> float:
    valid = [v for v in scores.values() if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


class PixelLevelAccumulator:
    """Cityscapes' pixel-level statistics, image by image; additive (``state`` / ``load_state``: one
    float64 vector, summable across processes)."""

    def __init__(self) -> None:
        self.labels = cityscapes_labels()
        rows = len(self.labels.instance_classes) + len(self.labels.instance_categories)
        self.confusion = np.zeros((NUM_LABEL_IDS, NUM_LABEL_IDS), np.int64)
        self.instances = np.zeros((rows, 4), np.float64)
        self.num_images = 0
        self._row_of_class = {c: i for i, c in enumerate(self.labels.instance_classes)}
        self._row_of_category = {name: len(self.labels.instance_classes) + i
                                 for i, (name, _) in enumerate(self.labels.instance_categories)}
        # Per labelId: the instance-category row its instances also count in (-1: none).
        self._category_row = np.full(NUM_LABEL_IDS, -1, np.int64)
        self._in_category = np.zeros((rows, NUM_LABEL_IDS), bool)
        for name, ids in self.labels.instance_categories:
            self._category_row[list(ids)] = self._row_of_category[name]
            self._in_category[self._row_of_category[name], list(ids)] = True
        self._weights = np.array([AVERAGE_INSTANCE_SIZE[self.labels.names[c]] for c in self.labels.instance_classes])

    def add_runs(self, gt_labels: np.ndarray, gt_instances: np.ndarray, pred_labels: np.ndarray,
                 lengths: np.ndarray, *, source: str = "prediction", gt_source: str = "ground truth") -> None:
        """Add one image given as runs of equal (gt labelId, gt instanceId, predicted labelId) pixels
        (int64 arrays of the same length; see ``evaluation.pq_stats.runs``)."""
        if gt_labels.size and int(gt_labels.max()) >= NUM_LABEL_IDS:
            bad = sorted(set(gt_labels[gt_labels >= NUM_LABEL_IDS].tolist()))
            raise UserInputError(f"{gt_source}: unknown labelIds {bad} (expected 0..{NUM_LABEL_IDS - 1})")
        if pred_labels.size and int(pred_labels.max()) >= NUM_LABEL_IDS:
            bad = sorted(set(pred_labels[pred_labels >= NUM_LABEL_IDS].tolist()))
            raise UserInputError(f"{source}: unknown labelIds {bad} (a Cityscapes semantic result holds "
                                 f"labelIds 0..{NUM_LABEL_IDS - 1}, not trainIds)")
        self.confusion += np.bincount(gt_labels * NUM_LABEL_IDS + pred_labels, weights=lengths,
                                      minlength=NUM_LABEL_IDS**2).astype(np.int64).reshape(NUM_LABEL_IDS, -1)
        self._add_instances(gt_instances, pred_labels, lengths, gt_source)
        self.num_images += 1

    def _add_instances(self, gt_instances: np.ndarray, pred_labels: np.ndarray, lengths: np.ndarray,
                       gt_source: str) -> None:
        keep = gt_instances > 1000
        instance_ids, inverse = np.unique(gt_instances[keep], return_inverse=True)
        if instance_ids.size == 0:
            return
        classes = instance_ids // 1000
        if int(classes.max()) >= NUM_LABEL_IDS:
            raise UserInputError(f"{gt_source}: instance ids {instance_ids[classes >= NUM_LABEL_IDS].tolist()} "
                                 "name no Cityscapes label")
        pred, run_lengths = pred_labels[keep], lengths[keep]
        sizes = np.bincount(inverse, weights=run_lengths, minlength=instance_ids.size)
        hits = pred == classes[inverse]
        tps = np.bincount(inverse, weights=run_lengths * hits, minlength=instance_ids.size)
        category_rows = self._category_row[classes]
        in_category = self._in_category[np.maximum(category_rows, 0)[inverse], pred]
        category_tps = np.bincount(inverse, weights=run_lengths * in_category, minlength=instance_ids.size)
        for k, label_id in enumerate(classes.tolist()):  # in the reference's order (ascending ids)
            row = self._row_of_class.get(label_id)
            if row is None:  # an ignored class (caravan, trailer)
                continue
            size, tp = sizes[k], tps[k]
            weight = self._weights[row] / float(size)
            self.instances[row] += (tp, size - tp, tp * weight, (size - tp) * weight)
            if category_rows[k] >= 0:
                ctp = category_tps[k]
                self.instances[category_rows[k]] += (ctp, size - ctp, ctp * weight, (size - ctp) * weight)

    def state(self) -> np.ndarray:
        return np.concatenate([self.confusion.reshape(-1).astype(np.float64), self.instances.reshape(-1)])

    def load_state(self, state: Any) -> None:
        state = np.asarray(state, np.float64).reshape(-1)
        size = self.confusion.size
        if state.size != size + self.instances.size:
            raise UserInputError(f"expected a pixel-level state of {size + self.instances.size} values, got {state.size}")
        self.confusion = np.rint(state[:size]).astype(np.int64).reshape(self.confusion.shape)
        self.instances = state[size:].reshape(self.instances.shape).copy()

    def compute(self) -> dict[str, Any]:
        """Fractions, NaN where undefined::

            {"class_iou": {name: v}, "class_iiou": {name: v}, "category_iou": {...}, "category_iiou": {...},
             "miou", "iiou", "category_miou", "category_iiou_mean"}
        """
        return pixel_level_scores(self.confusion, self.instances, self.labels, self._row_of_category)


def pixel_level_scores(confusion: np.ndarray, instances: np.ndarray, labels: CityscapesLabels,
                       row_of_category: Mapping[str, int]) -> dict[str, Any]:
    scored = labels.scored_ids
    class_iou, class_iiou = {}, {}
    for label_id in scored:
        name = labels.names[label_id]
        others = [i for i in scored if i != label_id]
        tp = int(confusion[label_id, label_id])
        fn = int(confusion[label_id, :].sum()) - tp
        fp = int(confusion[others, label_id].sum())
        class_iou[name] = _ratio(tp, fp, fn)
        if label_id in labels.instance_classes:
            row = labels.instance_classes.index(label_id)
            class_iiou[name] = _ratio(instances[row, TP_WEIGHTED], fp, instances[row, FN_WEIGHTED])
    category_iou, category_iiou = {}, {}
    instance_categories = dict(labels.instance_categories)
    for category in labels.categories:
        ids = labels.category_ids(category)
        outside = [i for i in scored if labels.category_of[i] != category]
        if not ids:
            continue  # void: no scored label
        tp = int(confusion[np.ix_(ids, ids)].sum())
        fn = int(confusion[ids, :].sum()) - tp
        fp = int(confusion[np.ix_(outside, ids)].sum())
        category_iou[category] = _ratio(tp, fp, fn)
        if category in instance_categories:
            row = row_of_category[category]
            fp_all = int(confusion[np.ix_(outside, list(instance_categories[category]))].sum())
            category_iiou[category] = _ratio(instances[row, TP_WEIGHTED], fp_all, instances[row, FN_WEIGHTED])
    return {"class_iou": class_iou, "class_iiou": class_iiou, "category_iou": category_iou,
            "category_iiou": category_iiou, "miou": _mean(class_iou), "iiou": _mean(class_iiou),
            "category_miou": _mean(category_iou), "category_iiou_mean": _mean(category_iiou)}


# --------------------------------------------------------------------------------------------
# COCO-panoptic datasets: mean IoU over the categories
# --------------------------------------------------------------------------------------------
class CategoryIoU:
    """Per-category IoU over the non-VOID pixels of a COCO-panoptic dataset; additive state
    (``state`` / ``load_state``: the float64 ``[C, 3]`` TP, FP, FN per category)."""

    def __init__(self, category_ids: Sequence[int]) -> None:
        self.category_ids = [int(c) for c in category_ids]
        self._index = {c: i + 1 for i, c in enumerate(self.category_ids)}  # 0: VOID / unknown
        self.counts = np.zeros((len(self.category_ids), 3), np.float64)

    def rows(self, category_ids: Sequence[int]) -> np.ndarray:
        return np.array([self._index.get(int(c), 0) for c in category_ids], np.int64)

    def add_runs(self, gt_rows: np.ndarray, pred_rows: np.ndarray, lengths: np.ndarray) -> None:
        """One image as runs: category row + 1 of the ground truth and of the prediction per run
        (0 = VOID / no segment), and run lengths."""
        size = len(self.category_ids) + 1
        joint = np.bincount(gt_rows * size + pred_rows, weights=lengths, minlength=size * size).reshape(size, size)
        valid = joint[1:]  # ground truth not VOID
        tp = np.diagonal(joint)[1:]
        self.counts[:, 0] += tp
        self.counts[:, 1] += valid.sum(0)[1:] - tp
        self.counts[:, 2] += valid.sum(1) - tp

    def state(self) -> np.ndarray:
        return self.counts.copy()

    def load_state(self, state: Any) -> None:
        self.counts = np.asarray(state, np.float64).reshape(self.counts.shape).copy()

    def compute(self) -> dict[str, Any]:
        """``{"per_class": {category_id: iou}, "miou"}`` (fractions; categories never seen are left out)."""
        per_class = {}
        for category_id, (tp, fp, fn) in zip(self.category_ids, self.counts.tolist()):
            if tp + fp + fn > 0:
                per_class[category_id] = tp / (tp + fp + fn)
        miou = sum(per_class.values()) / len(per_class) if per_class else math.nan
        return {"per_class": per_class, "miou": miou}
