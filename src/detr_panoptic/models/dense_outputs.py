"""Semantic maps and scored instance masks straight from DETR's queries (Mask2Former's semantic and
instance inference), the alternative to reading them off the panoptic result.

* ``semantic_from_queries``: per pixel, the class maximising sum over queries of p(class | query) x
  sigmoid(mask logit of the query) (the "no object" column left out), at 1/4 resolution, resized
  bilinearly to the processed size, arg-maxed, then resized (nearest, Pillow-exact) to the target size.
* ``instances_from_queries``: the ``top_k`` (query, thing class) pairs by class probability; each pair's
  mask is its query's mask logit > 0 at the target size, scored by the class probability times the mean
  mask probability inside the mask. AP rewards such ranked extra candidates.

Only the queries whose masks the forward pass computed (``output.mask_queries``) take part: the caller
asks the model for masks of the queries kept at a low ``candidate_threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from detr_panoptic.models.outputs import DETROutput, PanopticResult
from detr_panoptic.models.postprocess import image_masks, pillow_nearest_indices, valid_mask_size


def _nearest(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``values [..., h, w]`` resized to ``size`` with Pillow's nearest rule."""
    rows = torch.as_tensor(pillow_nearest_indices(values.shape[-2], size[0]), device=values.device)
    cols = torch.as_tensor(pillow_nearest_indices(values.shape[-1], size[1]), device=values.device)
    return values.index_select(-2, rows).index_select(-1, cols)


def semantic_from_queries(output: DETROutput, b: int, queries: torch.Tensor, processed_size: tuple[int, int],
                          target_size: tuple[int, int]) -> torch.Tensor:
    """Long ``[H, W]`` class index per pixel (``target_size``) of image ``b``; -1 where no query counts."""
    if queries.numel() == 0:
        return torch.full(target_size, -1, dtype=torch.long, device=output.pred_logits.device)
    probabilities = output.pred_logits[b, queries].float().softmax(-1)[:, :-1]  # [K, C]
    masks = image_masks(output, b, queries).float()
    valid_h, valid_w = valid_mask_size(tuple(masks.shape[-2:]), processed_size, output.input_size)
    scores = torch.einsum("kc,khw->chw", probabilities, masks[:, :valid_h, :valid_w].sigmoid())
    scores = F.interpolate(scores[None], size=processed_size, mode="bilinear", align_corners=False)[0]
    return _nearest(scores.argmax(0), target_size)


def instances_from_queries(output: DETROutput, b: int, queries: torch.Tensor, processed_size: tuple[int, int],
                           target_size: tuple[int, int], is_thing: torch.Tensor, top_k: int = 50
                           ) -> list[tuple[torch.Tensor, int, float]]:
    """Up to ``top_k`` (bool mask ``[H, W]``, class index, score) of image ``b``, best first; empty
    masks are left out."""
    if queries.numel() == 0:
        return []
    probabilities = output.pred_logits[b, queries].float().softmax(-1)[:, :-1]  # [K, C]
    probabilities = probabilities * is_thing.to(probabilities.device)[None, :].float()
    flat = probabilities.flatten()
    count = min(top_k, int((flat > 0).sum()))
    if count == 0:
        return []
    top_scores, top = flat.topk(count)
    rows, classes = top // probabilities.shape[1], top % probabilities.shape[1]
    used, where = rows.unique(return_inverse=True)
    logits = image_masks(output, b, queries[used]).float()
    valid_h, valid_w = valid_mask_size(tuple(logits.shape[-2:]), processed_size, output.input_size)
    logits = F.interpolate(logits[None, :, :valid_h, :valid_w], size=processed_size, mode="bilinear",
                           align_corners=False)[0]
    inside = logits > 0
    mask_scores = (logits.sigmoid() * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
    masks = _nearest(inside, target_size)
    out = []
    for k in range(count):
        mask = masks[where[k]]
        if bool(mask.any()):
            out.append((mask, int(classes[k]), float(top_scores[k] * mask_scores[where[k]])))
    return out


SOURCES = ("panoptic", "queries")


@dataclass(frozen=True)
class DenseOutputs:
    """Which semantic map and instances a predictor adds to each result (``PanopticResult.semantic`` /
    ``.instances``): ``"panoptic"`` reads them off the panoptic result (nothing is added: the writer does
    it), ``"queries"`` computes them from the queries kept at ``candidate_threshold`` (their masks are
    computed in the same forward pass); ``top_k`` instances per image at most."""

    semantic: str = "panoptic"
    instances: str = "panoptic"
    candidate_threshold: float = 0.1
    top_k: int = 50

    def __post_init__(self) -> None:
        for name in ("semantic", "instances"):
            if getattr(self, name) not in SOURCES:
                raise ValueError(f"{name} must be one of {SOURCES}, got {getattr(self, name)!r}")
        if not 0.0 <= self.candidate_threshold < 1.0 or self.top_k < 1:
            raise ValueError(f"candidate_threshold must be in [0, 1) and top_k >= 1, got {self}")

    @property
    def uses_queries(self) -> bool:
        return "queries" in (self.semantic, self.instances)


def add_dense_outputs(results: list[PanopticResult], output: DETROutput, dense: DenseOutputs,
                      processed_sizes: list[tuple[int, int]], target_sizes: list[tuple[int, int]],
                      is_thing: torch.Tensor, class_to_category: torch.Tensor | None) -> None:
    """Fill ``semantic`` (Long [H, W] category ids, -1 where none) and ``instances`` ((bool mask, category
    id, score) best first) of each result from the queries whose masks ``output`` holds."""
    categories: Any = None if class_to_category is None else class_to_category.tolist()
    for b, result in enumerate(results):
        queries = output.mask_queries[b] if output.mask_queries is not None else \
            torch.arange(output.pred_logits.shape[1], device=output.pred_logits.device)
        if dense.semantic == "queries":
            classes = semantic_from_queries(output, b, queries, processed_sizes[b], target_sizes[b])
            if class_to_category is not None:
                lookup = torch.cat([class_to_category.to(classes.device), torch.tensor([-1], device=classes.device)])
                classes = lookup[classes]  # -1 (no query) indexes the appended -1
            result.semantic = classes
        if dense.instances == "queries":
            found = instances_from_queries(output, b, queries, processed_sizes[b], target_sizes[b], is_thing,
                                           dense.top_k)
            result.instances = [(mask, c if categories is None else int(categories[c]), score)
                                for mask, c, score in found]
