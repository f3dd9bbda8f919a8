"""Detection figures for things, apart from segmentation (issue 15): does the model *find* the things?

PQ mixes finding an object with segmenting it. ``DetectionAccumulator`` separates them. Per image it is
given the ground-truth thing segments (category id, box xyxy, mask) and the kept queries (category id,
score, box xyxy in the same pixels and, optionally, the mask each one ended up with in the result) and
counts, per category and overall:

* **recall**: the share of ground-truth things that some kept query *of the same category* covers with
  box IoU >= ``iou_threshold`` (0.5);
* **kept per ground truth** (``kept_per_gt``): for each ground-truth thing, how many kept queries of its
  category have box IoU >= the threshold with it, averaged over ground-truth things -- 1 is ideal,
  above 1 are duplicates (``duplicates_per_gt``: the same minus one, over the found things only);
* **kept ratio** (``kept_ratio``): kept queries of the category / ground-truth things of it, whatever
  they overlap (a detector firing at the same places in every image shows here: 142 cars for 41);
* **mask IoU** (``mask_iou``): for each found thing, the mask IoU between it and the mask of its best
  box match (the same-category kept query of highest box IoU; an empty mask when that query lost its
  segment in the merge), averaged over found things.

Recall and mask IoU are percentages (0..100), as the PQ figures are. Pure accounting: torch tensors in,
numbers out; ``add`` per image, ``merge`` to combine accumulators (processes, shards), ``compute``.
``panoptic_detection_inputs`` builds ``add``'s arguments from a ground-truth id map + segments and a
``PanopticResult`` whose ``kept`` holds the kept queries (the ``inference`` interface), or, without
``kept`` (or with ``segments=True``), from its thing segments: the same figures for the output's segments,
each with the box of its mask (``inference.evaluators.DetectionEvaluator`` reports both, the latter as
``things_segment_*``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import box_iou


@dataclass
class _ClassCounts:
    gt: int = 0               # ground-truth things
    found: int = 0            # ... covered by a kept query of their category at IoU >= threshold
    hits: int = 0             # sum over ground truths of the kept queries of their category at IoU >= threshold
    kept: int = 0             # kept queries of the category
    mask_iou_sum: float = 0.0  # over found ground truths
    mask_iou_count: int = 0

    def merge(self, other: _ClassCounts) -> None:
        self.gt += other.gt
        self.found += other.found
        self.hits += other.hits
        self.kept += other.kept
        self.mask_iou_sum += other.mask_iou_sum
        self.mask_iou_count += other.mask_iou_count

    def figures(self) -> dict[str, Any]:
        nan = float("nan")
        return {
            "recall": 100.0 * self.found / self.gt if self.gt else nan,
            "kept_per_gt": self.hits / self.gt if self.gt else nan,
            "duplicates_per_gt": (self.hits - self.found) / self.found if self.found else nan,
            "kept_ratio": self.kept / self.gt if self.gt else nan,
            "mask_iou": 100.0 * self.mask_iou_sum / self.mask_iou_count if self.mask_iou_count else nan,
            "n_gt": self.gt, "n_found": self.found, "n_kept": self.kept,
        }


def _as_long(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1).cpu()


def _as_boxes(values: Any, what: str) -> torch.Tensor:
    boxes = torch.as_tensor(values, dtype=torch.float64).cpu()
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must be [N, 4] xyxy, got {tuple(boxes.shape)}")
    return boxes


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two Bool masks of one size (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


class DetectionAccumulator:
    """Accumulates the detection figures of things over images (see the module docstring)."""

    def __init__(self, iou_threshold: float = 0.5) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.per_class: dict[int, _ClassCounts] = {}
        self.images = 0

    def _counts(self, category: int) -> _ClassCounts:
        return self.per_class.setdefault(int(category), _ClassCounts())

    def add(self, gt_categories: Any, gt_boxes: Any, pred_categories: Any, pred_boxes: Any, *,
            gt_masks: torch.Tensor | None = None, pred_masks: torch.Tensor | None = None,
            pred_scores: Any = None) -> None:
        """One image. ``gt_*``: the ground-truth things (category ids [G], boxes [G, 4] xyxy, masks Bool
        [G, H, W]); ``pred_*``: the kept queries (category ids [K], boxes [K, 4] xyxy in the same pixels,
        masks Bool [K, H, W] as they are in the result). Masks are optional (no mask IoU without both).
        ``pred_scores`` [K] is checked for length only: every kept query counts, whatever its score."""
        gt_cat, pred_cat = _as_long(gt_categories), _as_long(pred_categories)
        gt_box, pred_box = _as_boxes(gt_boxes, "gt_boxes"), _as_boxes(pred_boxes, "pred_boxes")
        if len(gt_cat) != len(gt_box) or len(pred_cat) != len(pred_box):
            raise ValueError(f"{len(gt_cat)} gt categories for {len(gt_box)} boxes, {len(pred_cat)} predicted "
                             f"categories for {len(pred_box)} boxes")
        if pred_scores is not None and _as_boxes_len(pred_scores) != len(pred_cat):
            raise ValueError(f"{_as_boxes_len(pred_scores)} scores for {len(pred_cat)} kept queries")
        for name, masks, n in (("gt_masks", gt_masks, len(gt_cat)), ("pred_masks", pred_masks, len(pred_cat))):
            if masks is not None and (masks.dim() != 3 or masks.shape[0] != n):
                raise ValueError(f"{name} must be [{n}, H, W], got {tuple(masks.shape)}")
        with_masks = gt_masks is not None and pred_masks is not None
        if with_masks and len(gt_cat) and len(pred_cat) and gt_masks.shape[1:] != pred_masks.shape[1:]:
            raise ValueError(f"gt_masks {tuple(gt_masks.shape[1:])} and pred_masks {tuple(pred_masks.shape[1:])} "
                             f"differ in size")
        self.images += 1
        for category in pred_cat.tolist():
            self._counts(category).kept += 1
        iou = box_iou(gt_box, pred_box) if len(gt_cat) and len(pred_cat) else torch.zeros(len(gt_cat), len(pred_cat))
        same = gt_cat[:, None] == pred_cat[None, :]
        iou = torch.where(same, iou, torch.full_like(iou, -1.0))
        for g, category in enumerate(gt_cat.tolist()):
            counts = self._counts(category)
            counts.gt += 1
            hits = iou[g] >= self.iou_threshold
            counts.hits += int(hits.sum())
            if not bool(hits.any()):
                continue
            counts.found += 1
            if with_masks:
                best = int(iou[g].argmax())
                counts.mask_iou_sum += mask_iou(gt_masks[g].bool().cpu(), pred_masks[best].bool().cpu())
                counts.mask_iou_count += 1

    def merge(self, other: DetectionAccumulator) -> DetectionAccumulator:
        """Add ``other``'s counts to this one (same threshold); returns self."""
        if other.iou_threshold != self.iou_threshold:
            raise ValueError(f"cannot merge accumulators of IoU thresholds {self.iou_threshold} and "
                             f"{other.iou_threshold}")
        for category, counts in other.per_class.items():
            self._counts(category).merge(counts)
        self.images += other.images
        return self

    def compute(self) -> dict[str, Any]:
        """Overall figures (summed over categories) plus ``per_class`` (by category id as a string, as the
        PQ results are keyed), ``iou_threshold`` and ``images``."""
        total = _ClassCounts()
        for counts in self.per_class.values():
            total.merge(counts)
        return {**total.figures(), "iou_threshold": self.iou_threshold, "images": self.images,
                "per_class": {str(c): self.per_class[c].figures() for c in sorted(self.per_class)}}


def _as_boxes_len(values: Any) -> int:
    return int(torch.as_tensor(values).numel())


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes [N, 4] of Bool masks [N, H, W] in continuous pixel coordinates (a one-pixel mask at
    (y, x) is the box (x, y, x + 1, y + 1)), the convention of the predicted boxes (cxcywh x image size)."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float64)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
    return boxes


def panoptic_detection_inputs(gt_id_map: torch.Tensor, gt_segments: Sequence[Mapping[str, Any]],
                              result: Any, thing_ids: Iterable[int], *, segments: bool = False) -> dict[str, Any]:
    """``DetectionAccumulator.add`` keyword arguments for one image: the ground truth's non-crowd thing
    segments (``gt_id_map`` [H, W] of segment ids, COCO ``segments_info``) and the kept thing queries of
    ``result`` (a ``PanopticResult`` with ``kept``; each query's mask is its segment in ``result.id_map``,
    empty when the merge dropped it). A result without ``kept`` (``None``: a model that returns segments
    only) is counted by its thing segments instead, each with the box of its mask; so is every result with
    ``segments`` (the figures of what the output shows: a kept query whose segment the post-processing
    dropped is not in it)."""
    things = {int(t) for t in thing_ids}
    gt = [s for s in gt_segments if int(s["category_id"]) in things and not s.get("iscrowd", 0)]
    gt_id_map = torch.as_tensor(gt_id_map)
    gt_masks = torch.stack([gt_id_map == int(s["id"]) for s in gt]) if gt else \
        torch.zeros(0, *gt_id_map.shape, dtype=torch.bool)
    kept = None if segments else getattr(result, "kept", None)
    if kept is None:  # a result without its kept queries: its thing segments stand in for them
        segments = [s for s in result.segments_info if int(s["category_id"]) in things]
        id_map = torch.as_tensor(result.id_map).cpu()
        masks = torch.stack([id_map == int(s["id"]) for s in segments]) if segments else \
            torch.zeros(0, *id_map.shape, dtype=torch.bool)
        return {"gt_categories": [int(s["category_id"]) for s in gt], "gt_boxes": mask_boxes(gt_masks),
                "gt_masks": gt_masks, "pred_categories": [int(s["category_id"]) for s in segments],
                "pred_boxes": mask_boxes(masks), "pred_masks": masks,
                "pred_scores": [float(s.get("score", 1.0)) for s in segments]}
    is_thing = torch.tensor([int(c) in things for c in kept.category_ids.tolist()], dtype=torch.bool)
    chosen = is_thing.nonzero().squeeze(1)
    segment_of_query = {int(s["query"]): int(s["id"]) for s in result.segments_info if "query" in s}
    id_map = result.id_map.cpu()
    masks = [id_map == segment_of_query[q] if q in segment_of_query else torch.zeros_like(id_map, dtype=torch.bool)
             for q in kept.indices[chosen].tolist()]
    pred_masks = torch.stack(masks) if masks else torch.zeros(0, *id_map.shape, dtype=torch.bool)
    return {
        "gt_categories": [int(s["category_id"]) for s in gt],
        "gt_boxes": mask_boxes(gt_masks),
        "gt_masks": gt_masks,
        "pred_categories": kept.category_ids[chosen].cpu(),
        "pred_boxes": kept.boxes[chosen].cpu(),
        "pred_scores": kept.scores[chosen].cpu(),
        "pred_masks": pred_masks,
    }
