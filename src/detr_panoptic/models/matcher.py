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
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[DETROutput], targets: Sequence[Mapping[str, Any]]) -> list[MatchIndices]:
        """``forward`` for several outputs (the decoder layers) of one batch: every layer's, group's and
        image's cost is computed on the predictions' device and copied to the host in one transfer (one
        host sync per batch, not one per image, layer and group), then assigned on the CPU."""
        sizes = [int(t["labels"].shape[0]) for t in targets]
        for output in layers:
            if output.pred_logits.shape[0] != len(targets):
                raise ValueError(f"HungarianMatcher: {output.pred_logits.shape[0]} images of predictions but "
                                 f"{len(targets)} targets")
            if output.pred_logits.shape[1] % output.query_groups:
                raise ValueError(f"{output.pred_logits.shape[1]} queries cannot form {output.query_groups} equal "
                                 f"query groups")
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty.clone()) for _ in targets] for _ in layers]
        device = layers[0].pred_logits.device
        labels = torch.cat([t["labels"] for t in targets]).to(device, non_blocking=True)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device, non_blocking=True)
        # [B, Q, T] per layer (all images' targets, as the reference), flattened into one host copy
        costs = [self.cost_matrix(o.pred_logits.flatten(0, 1), o.pred_boxes.flatten(0, 1), labels, boxes)
                 for o in layers]
        host = torch.cat([c.flatten() for c in costs]).cpu()
        result, offset = [], 0
        for output, cost in zip(layers, costs):
            layer = host[offset:offset + cost.numel()].view(*output.pred_logits.shape[:2], -1)
            offset += cost.numel()
            result.append(self._assign(layer, sizes, output.query_groups))
        return result

    def _assign(self, cost: torch.Tensor, sizes: Sequence[int], groups: int) -> MatchIndices:
        """Per image (its own targets' columns) and group (consecutive rows): the optimal assignment."""
        per_group = cost.shape[1] // groups
        indices: MatchIndices = []
        start = 0
        for b, size in enumerate(sizes):
            rows_all, cols_all = [], []
            for g in range(groups if size else 0):
                block = cost[b, g * per_group:(g + 1) * per_group, start:start + size]
                if not torch.isfinite(block).all():
                    if self.raise_on_nonfinite:
                        raise FloatingPointError(f"matching cost for image {b} is not finite: the model's "
                                                 f"logits or boxes contain NaN/inf")
                    block = torch.nan_to_num(block, nan=1e8, posinf=1e8, neginf=-1e8)
                rows, cols = linear_sum_assignment(block.numpy())
                rows_all.append(torch.as_tensor(rows, dtype=torch.int64) + g * per_group)
                cols_all.append(torch.as_tensor(cols, dtype=torch.int64))
            start += size
            if not rows_all:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
            else:
                indices.append((torch.cat(rows_all), torch.cat(cols_all)))
        return indices


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
        self.aux_indices: list[MatchIndices] | None = None

    def __call__(self, outputs: DETROutput) -> list[torch.Tensor]:
        # the auxiliary layers are matched here too: all layers' costs reach the host in one copy
        self.indices, *aux = self.matcher.match_layers([outputs, *outputs.aux_outputs], self.targets)
        self.aux_indices = aux
        queries = [query_idx for query_idx, _ in self.indices]
        return split_sizes(to_device(torch.cat(queries), outputs.pred_logits.device), [len(q) for q in queries])


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: pinned and copied asynchronously on CUDA."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def split_sizes(tensor: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """``tensor`` cut into consecutive pieces of ``sizes`` (host-known, so no host sync)."""
    return list(torch.split(tensor, list(sizes)))


def build_matcher(*, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                  raise_on_nonfinite: bool = True) -> HungarianMatcher:
    return HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                            raise_on_nonfinite=raise_on_nonfinite)
