"""Semantic and instance scores for any COCO-panoptic dataset, from the same results as PQ:
``CocoMetrics`` (an evaluator: ``reset / process / evaluate``) measures

* mIoU over all categories (``evaluation.semantic.CategoryIoU``: IoU over the non-VOID pixels, mean over
  the categories that occur), from the result's query-based semantic map when it has one, else from its
  panoptic segments;
* COCO mask AP of the thing categories (``evaluation.coco_ap``, equal to pycocotools' ``COCOeval`` segm),
  from the result's query-based instances when it has them, else from its thing segments (scored by
  their class probability).

Percentages, like PQ. Under ``torch.distributed`` the IoU counts are summed and the AP records gathered.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from detr_panoptic.evaluation.panoptic_format import category_records
from detr_panoptic.inference.samples import InferenceSample
from detr_panoptic.models.outputs import PanopticResult


class CocoMetrics:
    name = "coco"

    def __init__(self, categories: Any) -> None:
        records = category_records(categories)
        self.category_ids = [int(r["id"]) for r in records]
        self.things = [int(r["id"]) for r in records if r.get("isthing") in (1, True)]
        self.reset()

    def reset(self) -> None:
        from detr_panoptic.evaluation.coco_ap import MaskAPAccumulator
        from detr_panoptic.evaluation.semantic import CategoryIoU

        self.iou = CategoryIoU(self.category_ids)
        self.ap = MaskAPAccumulator(self.things)

    def _rows(self, categories: np.ndarray) -> np.ndarray:
        table = np.zeros(max(self.category_ids + [0]) + 2, np.int64)  # the last entry: -1 (no category) -> 0
        table[self.category_ids] = self.iou.rows(self.category_ids)
        return table[np.clip(categories, -1, len(table) - 2)]

    def process(self, samples: Sequence[InferenceSample], results: Sequence[PanopticResult]) -> None:
        from detr_panoptic.evaluation.pq_stats import runs

        for sample, result in zip(samples, results):
            gt_ids = np.asarray(sample.target["gt_id_map"])
            segments = sample.target["gt_segments"]
            gt_categories = _category_map(gt_ids, {int(s["id"]): int(s["category_id"]) for s in segments})
            if result.semantic is not None:
                predicted = result.semantic.cpu().numpy()
            else:
                predicted = _category_map(result.id_map.cpu().numpy(),
                                          {int(s["id"]): int(s["category_id"]) for s in result.segments_info})
            gt_rows, pred_rows, lengths = runs(self._rows(gt_categories), self._rows(predicted))
            self.iou.add_runs(gt_rows, pred_rows, lengths)
            if result.instances is not None:
                detections = [(np.flatnonzero(m.cpu().numpy()), int(c), float(s)) for m, c, s in result.instances]
            else:
                id_map = result.id_map.cpu().numpy().reshape(-1)
                detections = [(np.flatnonzero(id_map == int(s["id"])), int(s["category_id"]), float(s.get("score", 1)))
                              for s in result.segments_info if int(s["category_id"]) in self.things]
            self.ap.add(gt_ids, segments, [d for d in detections if d[0].size])

    def evaluate(self) -> dict[str, Any]:
        """``{"miou", "mask_ap", "mask_ap50", "mask_ap75", "iou_per_class": {id: iou}}`` (percentages)."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
            total = torch.as_tensor(self.iou.state(), dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            self.iou.load_state(total.cpu().numpy())
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.ap.images)
            self.ap.images = [image for part in gathered for image in part]
        iou = self.iou.compute()
        stats = self.ap.compute()

        def percent(value: float) -> float | None:
            return None if math.isnan(value) or value < 0 else 100.0 * value

        return {"miou": percent(iou["miou"]), "mask_ap": percent(stats["ap"]), "mask_ap50": percent(stats["ap50"]),
                "mask_ap75": percent(stats["ap75"]),
                "iou_per_class": {str(k): 100.0 * v for k, v in iou["per_class"].items()}}


def _category_map(id_map: np.ndarray, category_of: dict[int, int]) -> np.ndarray:
    """Category id per pixel (-1: VOID or an id without a segment)."""
    largest = max([int(id_map.max(initial=0))] + list(category_of))
    table = np.full(largest + 1, -1, np.int64)
    for segment_id, category in category_of.items():
        table[segment_id] = category
    return table[id_map]
