"""Hungarian matching between predicted queries and target segments (one optimal assignment per image).

The cost of pairing query q with target t is the reference DETR cost::

    cost = cost_bbox * L1(box_q, box_t) - cost_class * prob_q[label_t] - cost_giou * GIoU(box_q, box_t)

with boxes as normalised (cx, cy, w, h) for L1 and converted to (x0, y0, x1, y1) for GIoU, and
``prob`` the softmax over the C+1 classes. Matching needs only logits and boxes, so it can run inside
the model's forward before any mask is computed (see ``QuerySelector``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from detr_panoptic.models.outputs import DETROutput

# Per image: (query indices [K], target indices [K]), both int64 on the CPU, sorted by query index.
MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets, per image.

    ``matcher(outputs, targets)`` returns, for each image, ``(query_indices, target_indices)`` of
    length ``min(num_queries, num_targets)``; images without targets get two empty tensors.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, *,
                 raise_on_nonfinite: bool = True) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one of cost_class, cost_bbox, "
                             "cost_giou must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        # Training sets this False: NaN/inf costs are then replaced by a large finite cost and the
        # (non-finite) loss is what stops the run -- on every process of a distributed run at once.
        self.raise_on_nonfinite = raise_on_nonfinite

    def cost_matrix(self, class_logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """Cost [Q, N] for one image: ``class_logits`` [Q, C+1], ``boxes`` [Q, 4] and ``target_boxes``
        [N, 4] normalised cxcywh, ``target_labels`` [N] class indices."""
        prob = class_logits.float().softmax(-1)
        boxes = boxes.float()
        target_boxes = target_boxes.to(boxes)
        cost_class = -prob[:, target_labels]
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                         box_convert(target_boxes, "cxcywh", "xyxy"))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: DETROutput, targets: Sequence[Mapping[str, Any]]) -> MatchIndices:
        """With ``outputs.query_groups`` K > 1 (Group-DETR training) each of the K groups of queries is
        matched one-to-one on its own: every target gets one query per group; query indices count over
        all groups."""
        if outputs.query_groups > 1:
            return self._match_groups(outputs, targets)
        batch_size = outputs.pred_logits.shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {batch_size} images of predictions but {len(targets)} targets")
        indices: MatchIndices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(outputs.pred_logits[b], outputs.pred_boxes[b], labels.to(outputs.pred_logits.device),
                                    target["boxes"])
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                if self.raise_on_nonfinite:
                    raise FloatingPointError(
                        f"matching cost for image {b} is not finite: the model's logits or boxes contain NaN/inf")
                cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


    def _match_groups(self, outputs: DETROutput, targets: Sequence[Mapping[str, Any]]) -> MatchIndices:
        groups, total = outputs.query_groups, outputs.pred_logits.shape[1]
        if total % groups:
            raise ValueError(f"{total} queries cannot form {groups} equal query groups")
        per_group = total // groups
        matched: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for g in range(groups):
            part = slice(g * per_group, (g + 1) * per_group)
            group_output = DETROutput(pred_logits=outputs.pred_logits[:, part], pred_boxes=outputs.pred_boxes[:, part])
            matched.append([(rows + g * per_group, cols) for rows, cols in self(group_output, targets)])
        return [(torch.cat([m[b][0] for m in matched]), torch.cat([m[b][1] for m in matched]))
                for b in range(len(targets))]


class QuerySelector:
    """A ``mask_queries`` callable for ``PanopticDETR.forward``: matches, then asks for masks of the
    matched queries only.

    The model calls it with its output (logits and boxes, no masks yet); it runs the matcher against
    ``targets``, keeps the result in ``self.indices`` (pass it to the criterion as ``indices=``) and
    returns the matched query indices per image. Matching and mask computation thus happen inside one
    forward, which keeps DistributedDataParallel's single-forward assumption intact.
    """

    def __init__(self, matcher: HungarianMatcher, targets: Sequence[Mapping[str, Any]]) -> None:
        self.matcher = matcher
        self.targets = targets
        self.indices: MatchIndices | None = None

    def __call__(self, outputs: DETROutput) -> list[torch.Tensor]:
        self.indices = self.matcher(outputs, self.targets)
        device = outputs.pred_logits.device
        return [query_idx.to(device) for query_idx, _ in self.indices]


def build_matcher(*, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                  raise_on_nonfinite: bool = True) -> HungarianMatcher:
    return HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                            raise_on_nonfinite=raise_on_nonfinite)
