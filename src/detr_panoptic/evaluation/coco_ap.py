"""COCO mask AP of scored instance masks against panoptic ground truth, equal to pycocotools'
``COCOeval(iouType="segm")`` (``stats[0:6]``: AP, AP50, AP75, AP small / medium / large).

Rules (pycocotools'): per image and category, detections sorted by score (at most 100); each is matched
greedily at IoU thresholds 0.50:0.95 to the unmatched ground-truth instance of highest IoU (non-crowd
first); a crowd ground truth (``iscrowd``) may absorb any number of detections, with IoU = intersection
/ detection area, and neither counts. Ground truth outside an area range is ignored for that range, as are
unmatched detections outside it. Precision at 101 recall points (monotone envelope), averaged over the
categories with ground truth.

Ground truth here is a panoptic id map with its segments (segments do not overlap, so a detection's
intersections come from one gather of the map at its pixels).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}
MAX_DETECTIONS = 100


class MaskAPAccumulator:
    """Per (image, category): detections' scores and match flags per IoU threshold and area range."""

    def __init__(self, category_ids: Sequence[int]) -> None:
        self.category_ids = sorted(int(c) for c in category_ids)
        self.images: list[dict[int, dict[str, Any]]] = []

    def add(self, gt_id_map: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
            detections: Sequence[tuple[np.ndarray, int, float]]) -> None:
        """One image: the ground truth (id map + segments with ``id``, ``category_id``, ``iscrowd``, ``area``
        optional) and detections (flat pixel indices, category id, score)."""
        flat = np.asarray(gt_id_map).reshape(-1)
        known = set(self.category_ids)
        segments = [s for s in gt_segments if int(s["category_id"]) in known]
        ids = np.array([int(s["id"]) for s in segments], np.int64)
        lookup = {int(v): k + 1 for k, v in enumerate(ids.tolist())}
        counts = np.bincount(flat.astype(np.int64)) if flat.size else np.zeros(1, np.int64)
        gt_area = np.array([float(s["area"]) if "area" in s else float(counts[i] if i < counts.size else 0)
                            for s, i in zip(segments, ids.tolist())], np.float64)
        gt_pixels = np.array([counts[i] if i < counts.size else 0 for i in ids.tolist()], np.float64)
        table = np.zeros(int(max(flat.max(initial=0), ids.max(initial=0))) + 1, np.int64)
        for value, k in lookup.items():
            table[value] = k
        per_category: dict[int, dict[str, Any]] = {}
        for category in self.category_ids:
            rows = [k for k, s in enumerate(segments) if int(s["category_id"]) == category]
            dets = sorted([d for d in detections if int(d[1]) == category], key=lambda d: -d[2])[:MAX_DETECTIONS]
            if not rows and not dets:
                continue
            crowd = np.array([int(segments[k].get("iscrowd", 0)) == 1 for k in rows], bool)
            ious = np.zeros((len(dets), len(rows)))
            for j, (pixels, _, _) in enumerate(dets):
                hits = np.bincount(table[flat[pixels]], minlength=len(ids) + 1)
                inter = hits[[k + 1 for k in rows]].astype(np.float64)
                union = np.where(crowd, float(len(pixels)), gt_pixels[rows] + len(pixels) - inter)
                ious[j] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
            per_category[category] = _match(ious, crowd, gt_area[rows],
                                            np.array([float(len(d[0])) for d in dets]), np.array([d[2] for d in dets]))
        self.images.append(per_category)

    def compute(self) -> dict[str, float]:
        """Fractions: ``ap, ap50, ap75, ap_small, ap_medium, ap_large`` (-1 where no category has ground truth)."""
        precision = np.full((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(self.category_ids), len(AREA_RANGES)), -1.0)
        for k, category in enumerate(self.category_ids):
            entries = [image[category] for image in self.images if category in image]
            for a, name in enumerate(AREA_RANGES):
                precision[:, :, k, a] = _precision(entries, name)
        stats = {}
        for key, t, a in (("ap", None, 0), ("ap50", 0, 0), ("ap75", 5, 0), ("ap_small", None, 1),
                          ("ap_medium", None, 2), ("ap_large", None, 3)):
            values = precision[:, :, :, a] if t is None else precision[t, :, :, a]
            values = values[values > -1]
            stats[key] = float(np.mean(values)) if values.size else -1.0
        return stats


def _match(ious: np.ndarray, crowd: np.ndarray, gt_area: np.ndarray, dt_area: np.ndarray, scores: np.ndarray
           ) -> dict[str, Any]:
    """pycocotools' ``evaluateImg`` for every area range (maxDets 100): per range, the detections'
    matched flags and ignore flags ``[T, D]`` and the ground truth's ignore flags."""
    out: dict[str, Any] = {"scores": scores}
    for name, (low, high) in AREA_RANGES.items():
        ignore = crowd | (gt_area < low) | (gt_area > high)
        order = np.argsort(ignore, kind="mergesort")
        g_ignore, g_crowd, g_ious = ignore[order], crowd[order], ious[:, order]
        matched = np.zeros((len(IOU_THRESHOLDS), len(scores)), bool)
        d_ignore = np.zeros_like(matched)
        for t, threshold in enumerate(IOU_THRESHOLDS):
            taken = np.zeros(len(order), bool)
            for d in range(len(scores)):
                best, m = min(threshold, 1 - 1e-10), -1
                for g in range(len(order)):
                    if taken[g] and not g_crowd[g]:
                        continue
                    if m > -1 and not g_ignore[m] and g_ignore[g]:
                        break
                    if g_ious[d, g] < best:
                        continue
                    best, m = g_ious[d, g], g
                if m == -1:
                    continue
                d_ignore[t, d] = g_ignore[m]
                matched[t, d] = True
                taken[m] = True
        outside = (dt_area < low) | (dt_area > high)
        d_ignore |= ~matched & outside[None, :]
        out[name] = (matched, d_ignore, g_ignore)
    return out


def _precision(entries: Sequence[dict[str, Any]], area: str) -> np.ndarray:
    """``[T, R]`` interpolated precision of one category and area range (pycocotools' ``accumulate``)."""
    result = np.full((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)), -1.0)
    if not entries:
        return result
    scores = np.concatenate([e["scores"] for e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e[area][0] for e in entries], axis=1)[:, order]
    ignored = np.concatenate([e[area][1] for e in entries], axis=1)[:, order]
    positives = int(np.count_nonzero(np.concatenate([e[area][2] for e in entries]) == 0))
    if positives == 0:
        return result
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
        recall = tp / positives
        precision = (tp / (fp + tp + np.spacing(1))).tolist()
        for i in range(len(precision) - 1, 0, -1):
            precision[i - 1] = max(precision[i - 1], precision[i])
        q = np.zeros(len(RECALL_THRESHOLDS))
        for r, p in enumerate(np.searchsorted(recall, RECALL_THRESHOLDS, side="left")):
            if p < len(precision):
                q[r] = precision[p]
        result[t] = q
    return result
