"""Typed containers for what the model and the post-processor return."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DETROutput:
    """Raw predictions of ``PanopticDETR``.

    pred_logits: [B, Q, C+1] class logits (last index: "no object").
    pred_boxes:  [B, Q, 4] normalised (cx, cy, w, h) in [0, 1], relative to each image's unpadded size.
    pred_masks:  [B, Q, H/4, W/4] mask logits at 1/4 of the padded batch for every query; or, when
                 ``mask_queries`` is set, [N, H/4, W/4] for only those queries, packed image by image
                 in the order of ``mask_queries`` (training computes masks only for matched queries);
                 or None when masks were not computed.
    mask_queries: per image, LongTensor of the query indices whose masks are in ``pred_masks``;
                 None means "all queries, [B, Q, H/4, W/4]".
    aux_outputs: per intermediate decoder layer, a ``DETROutput`` with logits and boxes only.
    attentions:  optional attention weights, filled only when asked for (visualisation).
    input_size:  (H, W) of the padded batch the model saw (set by ``PanopticDETR``); lets the
                 post-processor crop each image's valid part of the masks. None: masks are unpadded.
    image_sizes: (h, w) of each image's unpadded part of the batch (set by ``PanopticDETR``): the size the
                 post-processor resizes masks to before the final resize.
    query_groups: K > 1 only in training with query groups (``PanopticDETR.enable_query_groups``): the
                 Q queries are K groups of Q / K, one after the other, each matched on its own.
    branches:    in training with query branches (``models.query_branches``): each branch's output
                 (``BranchOutput``: its predictions and ``losses``), by branch name; empty otherwise.
    """

    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor
    pred_masks: torch.Tensor | None = None
    mask_queries: list[torch.Tensor] | None = None
    aux_outputs: list[DETROutput] = field(default_factory=list)
    attentions: dict[str, Any] | None = None
    input_size: tuple[int, int] | None = None
    query_groups: int = 1
    branches: dict[str, Any] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] | None = None


@dataclass
class KeptQueries:
    """The queries of one image that passed the kept-query rule (``postprocess.kept_queries``), before
    segments are merged or dropped.

    indices: Long [K] query indices; labels: Long [K] class indices; category_ids: Long [K];
    scores: Float [K] best-class probabilities; boxes: Float [K, 4] xyxy in pixels of the result's
    id map (the original image).
    """

    indices: torch.Tensor
    labels: torch.Tensor
    category_ids: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())

    def to(self, device: torch.device | str) -> KeptQueries:
        return KeptQueries(*(t.to(device) for t in (self.indices, self.labels, self.category_ids, self.scores,
                                                     self.boxes)))


@dataclass
class PanopticResult:
    """One image's panoptic prediction.

    id_map: LongTensor [H, W] of segment ids; 0 is void; ids are 1..len(segments_info).
    segments_info: one dict per segment: ``id``, ``category_id``, ``isthing``, ``area``, ``score``
    (and ``query``: the index of the decoder query that produced it).
    kept: the kept queries (``KeptQueries``), when the post-processor was given their boxes.
    semantic: optional Long [H, W] category id per pixel (-1: none) from the queries
        (``models.dense_outputs``); None: read it off the panoptic segments.
    instances: optional list of (Bool [H, W] mask, category id, score), best first, from the queries.
    """

    id_map: torch.Tensor
    segments_info: list[dict[str, Any]]
    kept: KeptQueries | None = None
    semantic: torch.Tensor | None = None
    instances: list[tuple[torch.Tensor, int, float]] | None = None

    def cpu(self) -> PanopticResult:
        return PanopticResult(self.id_map.cpu(), self.segments_info,
                              self.kept.to("cpu") if self.kept is not None else None,
                              self.semantic.cpu() if self.semantic is not None else None,
                              None if self.instances is None else [(m.cpu(), c, s) for m, c, s in self.instances])
